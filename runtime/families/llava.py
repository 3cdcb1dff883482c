"""LLaVA-1.5 (``LlavaForConditionalGeneration``, ``model_type == "llava"``) and its CLIP vision tower.

Each image becomes one contiguous run of ``<image>`` placeholders: the CLIP feature layer's patch
tokens (strategy ``default`` drops CLS), ``s × s`` of them for an ``s``-patch-wide crop. That run
is the image's one pre-LLM view. The recipe's unit is one image: ``(image_size / patch_size)²``
tokens (plus CLS for strategy ``full``).

Vision signals (CLIP-style encoders, shared with LLaVA-NeXT):

* ``"attention"``: the CLS row of the attention at the feature layer, averaged over heads,
  recomputed from the input of that layer's attention module (a forward pre-hook on ``q_proj`` /
  ``k_proj``);
* ``"features"``: the CLS and patch hidden states the model's feature layer outputs (a forward hook).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from .. import prellm
from ..errors import StageCannotRun
from .base import Encoded, Family, Signal, View, register_family


@register_family("llava")
class LlavaFamily(Family):
    """LLaVA-1.5: one contiguous run of image tokens per image, CLIP vision tower."""

    pre_llm = True
    signals = {"attention": None, "features": None, "encoder_patches": None}
    vllm_architecture = "RecipePrunedLlavaForConditionalGeneration"

    def reference_visual_tokens(self, config: Any) -> int:
        return self.crop_tokens(config)

    def crop_tokens(self, config: Any) -> int:
        """Projected tokens of one crop: ``(image_size / patch_size)²``, plus CLS for strategy ``full``."""
        vision = config.vision_config
        patches = (int(vision.image_size) // int(vision.patch_size)) ** 2
        strategy = getattr(config, "vision_feature_select_strategy", "default")
        return patches + (1 if strategy == "full" else 0)

    def crop_side(self, config: Any) -> int:
        """Patches along one side of a crop."""
        return int(config.vision_config.image_size) // int(config.vision_config.patch_size)

    # ------------------------------------------------------------------ pre-LLM stages
    def vision_layers(self, model: Any) -> torch.nn.ModuleList:
        """The CLIP tower's ``encoder.layers``."""
        tower = self.base_model(model).vision_tower
        encoder = getattr(tower, "encoder", None) or getattr(getattr(tower, "vision_model", None), "encoder", None)
        if encoder is None:
            raise ValueError(f"{type(tower).__name__} has no .encoder.layers; pre-LLM stages support CLIP-style encoders")
        return encoder.layers

    def default_feature_layer(self, model: Any) -> Any:
        return getattr(model.config, "vision_feature_layer", -2)

    def stage_precondition(self, model: Any) -> str | None:
        if getattr(model.config, "vision_feature_select_strategy", "default") != "default":
            return "pre-LLM stages need vision_feature_select_strategy 'default' (one token per patch)"
        return super().stage_precondition(model)

    def signal_hooks(self, model: Any, capture: set, feature_layer: int | None, record: Callable[[str, torch.Tensor], None]) -> list:
        layers = self.vision_layers(model)
        hooks = []
        if "attention" in capture:
            def on_attention_input(module: Any, args: tuple, kwargs: dict) -> None:
                record("attention", cls_attention(module, args[0] if args else kwargs["hidden_states"]))

            attn = layers[self.feature_encoder_layer(model, feature_layer)].self_attn
            hooks.append(attn.register_forward_pre_hook(on_attention_input, with_kwargs=True))
        if "features" in capture:
            def on_layer_output(module: Any, args: tuple, output: Any) -> None:
                record("features", (output[0] if isinstance(output, tuple) else output).detach())

            hooks.append(layers[self.feature_encoder_layer(model)].register_forward_hook(on_layer_output))
        return hooks

    def views(self, model: Any, roles: Any, row: int, positions: torch.Tensor, encoded: Encoded, index: int,
              signal: Signal) -> list[View]:
        """One view per image: its ``s × s`` patch grid; signals indexed by image (``(images, P)``)."""
        n = positions.numel()
        side = math.isqrt(n)
        view = View(row, positions, (side, side) if side * side == n else None)
        for name in ("attention", "features"):
            store = signal(name)
            if store is None:
                continue
            width = store.shape[1] - (1 if name == "features" else 0)
            if index >= store.shape[0] or width != n:
                raise StageCannotRun(f"an image has {n} tokens but its encoder signal has {width} patches (strategy 'default' expected)")
            if name == "attention":
                view.attention = store[index].float()
            else:
                view.clssim = prellm.cls_similarity(store[index][1:], store[index][0])
        return [view]


def cls_attention(module: Any, x: torch.Tensor) -> torch.Tensor:
    """(N, P): a CLIP attention module's CLS → patch attention, head mean, from its input ``x`` (N, 1 + P, D)."""
    with torch.no_grad():
        n, t, _ = x.shape
        heads = x.shape[-1] // module.head_dim
        q = module.q_proj(x[:, :1]).float().view(n, 1, heads, module.head_dim).transpose(1, 2)
        k = module.k_proj(x).float().view(n, t, heads, module.head_dim).transpose(1, 2)
        probs = torch.softmax((q @ k.transpose(-1, -2)) * module.scale, dim=-1)  # (N, H, 1, T)
        return probs[:, :, 0, 1:].mean(dim=1)

"""InternVL 2.5 / 3 (``InternVLForConditionalGeneration``, ``model_type == "internvl"``): tiles and pixel shuffle.

Each image is cut by the processor into up to ``max_patches`` tiles of ``vision_config.image_size``
pixels (dynamic tiling: the grid whose aspect ratio is closest to the image's, plus a thumbnail
when there is more than one tile). The InternViT encoder runs once per tile on its patches plus a
CLS token; strategy ``default`` drops CLS, and a **pixel shuffle** (``downsample_ratio`` 0.5) folds
every 2×2 block of patches into one token: ``(448 / 14)² / 4 = 256`` tokens per 448-px tile. The
image's placeholders are ``<img>``, ``256 · tiles`` ``<IMG_CONTEXT>`` tokens, ``</img>``; only the
context tokens are visual (the brackets are text).

The recipe's unit is one tile (a 448 × 448 image is exactly one tile): 256 tokens. An image of
``t`` tiles scales the recipe's ratios to its ``256 · t`` tokens, like any other family.

Pre-LLM views: one per tile (each tile is encoded on its own, with its own CLS), the shuffled
``(s/2) × (s/2)`` grid. The vision signals are read per tile on the encoder's patch grid and mapped
onto the shuffled tokens through the model's own ``pixel_shuffle`` run on index-coded dummies
(:func:`shuffle_sources`): a token's CLS attention is the sum over its 2×2 source patches (the
attention CLS pays to that region), its CLS similarity their mean.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import torch

from .. import prellm
from ..errors import StageCannotRun
from .base import Encoded, Family, Signal, View, register_family


def _side(value: Any) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def tile_patches(config: Any) -> int:
    """Patches along one side of a tile: ``image_size / patch_size`` (32 for InternViT-448)."""
    return _side(config.vision_config.image_size) // _side(config.vision_config.patch_size)


def tile_tokens(config: Any) -> int:
    """Visual tokens of one tile after the pixel shuffle: ``(side · downsample_ratio)²`` (256)."""
    side = tile_patches(config) * float(config.downsample_ratio)
    return int(round(side)) ** 2


@functools.lru_cache(maxsize=64)
def _sources(side: int, ratio: float) -> torch.Tensor:
    from transformers.models.internvl.modeling_internvl import InternVLModel

    coded = torch.arange(side * side, dtype=torch.float64).view(1, side, side, 1)
    shuffled = InternVLModel.pixel_shuffle(None, coded, scale_factor=ratio)  # (1, s', s', 1/ratio²)
    return shuffled.reshape(-1, shuffled.shape[-1]).round().long()


def shuffle_sources(config: Any) -> torch.Tensor:
    """int64 ``(tokens, 1/ratio²)``: per shuffled token of a tile, the encoder patches it folds
    (row-major patch index, CLS excluded), from the model's own ``pixel_shuffle``."""
    return _sources(tile_patches(config), float(config.downsample_ratio))


@register_family("internvl")
class InternVLFamily(Family):
    """InternVL: tiles of an InternViT with CLS, pixel-shuffled 2×2 into one token each."""

    vision_fields = Family.vision_fields + ("attention_bias", "use_qk_norm", "norm_type", "use_mean_pooling")
    top_fields = Family.top_fields + ("downsample_ratio",)
    pre_llm = True
    signals = {
        "attention": None,
        "features": None,
        "encoder_patches": "its pixel shuffle folds 2×2 encoder patches into one token before the projector, so encoder "
                           "patches are not language-model tokens and merged encoder features cannot be projected",
    }
    vllm_refusal = ("InternVL is not served by the vLLM plugin: it has no model class for InternVL's tiles and pixel "
                    "shuffle, and none is tested; serve it with the HF runtime (runtime.load(recipe).apply(model))")

    def reference_visual_tokens(self, config: Any) -> int:
        """Tokens of one tile (a 448 × 448 image): 256 for every released InternVL 2.5 / 3."""
        return tile_tokens(config)

    # ------------------------------------------------------------------ pre-LLM stages
    def vision_layers(self, model: Any) -> torch.nn.ModuleList:
        """The InternViT's ``encoder.layer``."""
        return self.base_model(model).vision_tower.encoder.layer

    def stage_precondition(self, model: Any) -> str | None:
        if getattr(model.config, "vision_feature_select_strategy", "default") != "default":
            return "pre-LLM stages need vision_feature_select_strategy 'default' (CLS dropped before the pixel shuffle)"
        return super().stage_precondition(model)

    def signal_hooks(self, model: Any, capture: set, feature_layer: int | None, record: Callable[[str, torch.Tensor], None]) -> list:
        layers = self.vision_layers(model)
        hooks = []
        if "attention" in capture:
            def on_attention_input(module: Any, args: tuple, kwargs: dict) -> None:
                record("attention", cls_attention(module, args[0] if args else kwargs["hidden_states"]))

            attn = layers[self.feature_encoder_layer(model, feature_layer)].attention
            hooks.append(attn.register_forward_pre_hook(on_attention_input, with_kwargs=True))
        if "features" in capture:
            def on_layer_output(module: Any, args: tuple, output: Any) -> None:
                record("features", (output[0] if isinstance(output, tuple) else output).detach())

            hooks.append(layers[self.feature_encoder_layer(model)].register_forward_hook(on_layer_output))
        return hooks

    def views(self, model: Any, roles: Any, row: int, positions: torch.Tensor, encoded: Encoded, index: int,
              signal: Signal) -> list[View]:
        """One view per tile (each feature block is one tile); signals indexed by tile (``(tiles, P)``)."""
        n = positions.numel()
        side = math.isqrt(n)
        view = View(row, positions, (side, side) if side * side == n else None)
        sources = shuffle_sources(model.config)
        for name in ("attention", "features"):
            store = signal(name)
            if store is None:
                continue
            patches = store.shape[1] - (1 if name == "features" else 0)
            if index >= store.shape[0] or sources.shape[0] != n or patches != sources.numel():
                raise StageCannotRun(f"a tile has {n} tokens but its encoder signal has {patches} patches "
                                     f"({sources.shape[0]} tokens of {sources.shape[1]} patches expected)")
            src = sources.to(store.device)
            if name == "attention":
                view.attention = store[index].float()[src].sum(dim=-1)
            else:
                view.clssim = prellm.cls_similarity(store[index][1:], store[index][0])[src].mean(dim=-1)
        return [view]


def cls_attention(module: Any, x: torch.Tensor) -> torch.Tensor:
    """(N, P): an InternViT attention module's CLS → patch attention, head mean, from its input ``x`` (N, 1 + P, D)."""
    with torch.no_grad():
        n, t, _ = x.shape
        heads, dim = module.num_heads, module.head_dim
        q = module.q_norm(module.q_proj(x[:, :1])).float().view(n, 1, heads, dim).transpose(1, 2)
        k = module.k_norm(module.k_proj(x)).float().view(n, t, heads, dim).transpose(1, 2)
        probs = torch.softmax((q @ k.transpose(-1, -2)) * module.scale, dim=-1)  # (N, H, 1, T)
        return probs[:, :, 0, 1:].mean(dim=1)

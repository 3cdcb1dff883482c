"""The pre-LLM stage at run time: drop visual tokens on entry to decoder layer 0.

A stage is a selection on entry to layer 0 (the "K = 0 pruner"), so it needs nothing beyond the
pruner's own mechanism and works unchanged under ``generate()``. What each method reads:

* ``g-prune``: the projected image features, which are exactly the language model's input
  embeddings at the image positions (:meth:`Policy.on_inputs`);
* ``fopru-rank`` / ``fopru-row``: the CLS row of the vision encoder's attention at the feature
  layer, recomputed from the input of that layer's attention module (a forward pre-hook; CLIP has
  no rotary embedding, so ``softmax(q_cls·Kᵀ·scale)`` is the attention row itself);
* ``cls-inflection``: the CLS and patch hidden states the feature layer outputs (a forward hook).

The vision tower runs before the language model in the same forward, and images map in order to
the runs of image tokens (LLaVA-1.5 ``default`` strategy: the CLS feature is dropped, one token per
patch). Supported: ``model_type == "llava"`` with a CLIP-style encoder and a single integer
``vision_feature_layer``. Pure torch; the scorers are in :mod:`runtime.prellm`.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from . import prellm

FIXED_RATIO_METHODS = ("g-prune", "fopru-rank", "fopru-row")
STAGE_METHODS = (*FIXED_RATIO_METHODS, "cls-inflection")
GPRUNE_DEFAULTS = {"threshold": 0.5, "temperature": 0.03, "steps": 5}


def stage_count(keep_ratio: float, n: int) -> int:
    """Tokens a fixed-ratio stage keeps of an image's ``n``: ``round_half_up(keep_ratio · n)``."""
    return min(int(n), max(0, int(math.floor(float(keep_ratio) * int(n) + 0.5))))


def feature_encoder_layer(model: Any) -> int:
    """Index of the vision-encoder layer whose output is the LLaVA feature layer.

    Raises:
        ValueError: not a single-layer CLIP-style LLaVA feature selection.
    """
    config = model.config
    layers = vision_layers(model)
    index = getattr(config, "vision_feature_layer", -2)
    if not isinstance(index, int):
        raise ValueError(f"vision_feature_layer {index!r} is not a single layer; pre-LLM stages need one")
    hidden_index = index if index >= 0 else len(layers) + 1 + index  # hidden_states[0] = embeddings
    if not 1 <= hidden_index <= len(layers):
        raise ValueError(f"vision_feature_layer {index} selects no encoder layer output")
    return hidden_index - 1


def vision_layers(model: Any) -> torch.nn.ModuleList:
    base = model if hasattr(model, "language_model") else model.model
    tower = base.vision_tower
    encoder = getattr(tower, "encoder", None) or getattr(getattr(tower, "vision_model", None), "encoder", None)
    if encoder is None:
        raise ValueError(f"{type(tower).__name__} has no .encoder.layers; pre-LLM stages support CLIP-style encoders")
    return encoder.layers


def check_supported(model: Any) -> None:
    """Raise ValueError saying why ``model`` cannot run a pre-LLM stage."""
    config = model.config
    if config.model_type != "llava":
        raise ValueError(f"pre-LLM stages support model_type 'llava' only, not {config.model_type!r}")
    if getattr(config, "vision_feature_select_strategy", "default") != "default":
        raise ValueError("pre-LLM stages need vision_feature_select_strategy 'default' (one token per patch)")
    feature_encoder_layer(model)


class PreLLMStage:
    """One pre-LLM method with its parameters; hooks the vision encoder and picks layer-0 survivors.

    Args:
        method: one of :data:`STAGE_METHODS`.
        keep_ratio: fraction of each image's tokens kept (fixed-ratio methods; ignored by
            ``cls-inflection``, whose count is the knee of each image's curve).
        params: G-Prune ``threshold``, ``temperature``, ``steps``.
        capture: which vision signals to record: ``{"attention", "features"}`` (default: what
            ``method`` needs; the calibration pass asks for all).
    """

    def __init__(self, method: str, keep_ratio: float = 1.0, params: dict | None = None, capture: set | None = None) -> None:
        if method not in STAGE_METHODS:
            raise ValueError(f"unknown pre-LLM method {method!r}; choose one of {', '.join(STAGE_METHODS)}")
        self.method = method
        self.keep_ratio = float(keep_ratio)
        self.params = {**GPRUNE_DEFAULTS, **{k: v for k, v in (params or {}).items() if k in GPRUNE_DEFAULTS}}
        if capture is None:
            capture = {"attention"} if method.startswith("fopru") else {"features"} if method == "cls-inflection" else set()
        self.capture = set(capture)
        self._attention: list[torch.Tensor] = []  # per vision forward: (N_img, P) CLS→patch, head mean
        self._features: list[torch.Tensor] = []  # per vision forward: (N_img, 1 + P, D)
        self._embeds: torch.Tensor | None = None

    # ------------------------------------------------------------------ hooks
    def attach(self, model: Any) -> list:
        """Install the vision-encoder hooks this stage needs; returns removable handles."""
        if not self.capture:
            return []
        check_supported(model)
        layer = vision_layers(model)[feature_encoder_layer(model)]
        base = model if hasattr(model, "language_model") else model.model
        hooks = [base.vision_tower.register_forward_pre_hook(self._reset)]
        if "attention" in self.capture:
            hooks.append(layer.self_attn.register_forward_pre_hook(self._on_attention_input, with_kwargs=True))
        if "features" in self.capture:
            hooks.append(layer.register_forward_hook(self._on_layer_output))
        return hooks

    def _reset(self, module: Any, args: tuple) -> None:
        self._attention, self._features = [], []

    def _on_attention_input(self, module: Any, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs["hidden_states"]
        with torch.no_grad():
            n, t, _ = x.shape
            heads = x.shape[-1] // module.head_dim
            q = module.q_proj(x[:, :1]).float().view(n, 1, heads, module.head_dim).transpose(1, 2)
            k = module.k_proj(x).float().view(n, t, heads, module.head_dim).transpose(1, 2)
            probs = torch.softmax((q @ k.transpose(-1, -2)) * module.scale, dim=-1)  # (N, H, 1, T)
            self._attention.append(probs[:, :, 0, 1:].mean(dim=1))

    def _on_layer_output(self, module: Any, args: tuple, output: Any) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        self._features.append(hidden.detach())

    def on_inputs(self, embeds: torch.Tensor) -> None:
        self._embeds = embeds

    # ------------------------------------------------------------------ per image
    def images(self, roles: Any) -> list[tuple[int, torch.Tensor]]:
        """(row, prompt positions) of each image's token run, in the order the encoder saw them."""
        out = []
        for row in range(roles.visual.shape[0]):
            positions = torch.nonzero(roles.visual[row]).flatten()
            if positions.numel() == 0:
                continue
            breaks = torch.nonzero(positions[1:] != positions[:-1] + 1).flatten() + 1
            for run in torch.tensor_split(positions, breaks.cpu()):
                out.append((row, run))
        return out

    def _signal(self, name: str, image: int, n: int) -> torch.Tensor:
        store = torch.cat(self._attention) if name == "attention" else torch.cat(self._features)
        if image >= store.shape[0]:
            raise RuntimeError("the vision encoder saw fewer images than the prompt has image-token runs")
        value = store[image]
        width = value.shape[0] - (1 if name == "features" else 0)
        if width != n:
            raise RuntimeError(f"image {image} has {n} tokens but {width} encoder patches (strategy 'default' expected)")
        return value

    def scores(self, roles: Any) -> list[dict]:
        """Per image: its row, positions and every captured score (calibration statistics)."""
        out = []
        for image, (row, positions) in enumerate(self.images(roles)):
            entry = {"row": row, "positions": positions}
            n = positions.numel()
            if self._embeds is not None:
                x = self._embeds[row, positions.to(self._embeds.device)]
                entry["gprune"] = prellm.gprune_scores(x, **self.params)
            if "attention" in self.capture:
                entry["fopru"] = self._signal("attention", image, n).float()
            if "features" in self.capture:
                feats = self._signal("features", image, n)
                entry["clssim"] = prellm.cls_similarity(feats[1:], feats[0])
            out.append(entry)
        return out

    def keep(self, roles: Any) -> torch.Tensor:
        """(B, L) bool: the visual tokens that enter layer 0."""
        kept = torch.zeros_like(roles.visual)
        for image, (row, positions) in enumerate(self.images(roles)):
            n = positions.numel()
            if self.method == "g-prune":
                x = self._embeds[row, positions.to(self._embeds.device)]
                mask = prellm.gprune_keep(x, stage_count(self.keep_ratio, n), **self.params)
            elif self.method == "fopru-rank":
                mask = prellm.fopru_rank_keep(self._signal("attention", image, n), stage_count(self.keep_ratio, n))
            elif self.method == "fopru-row":
                side = math.isqrt(n)
                if side * side != n:
                    raise RuntimeError(f"fopru-row needs a square patch grid, got {n} tokens")
                mask = prellm.fopru_row_keep(self._signal("attention", image, n), (side, side), stage_count(self.keep_ratio, n))
            else:
                feats = self._signal("features", image, n)
                mask = prellm.cls_inflection_keep(feats[1:], feats[0])
            kept[row, positions] = mask.to(kept.device)
        self._embeds = None
        return kept

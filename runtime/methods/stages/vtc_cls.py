"""VTC-CLS (THU-MIG/VTC-CLS): keep the patches with the most CLS attention summed over encoder layers.

For every vision layer in ``[start_layer, depth − 1)`` (the reference's
``attentions[start_layer:-1]``; ``--layer 16`` on CLIP-L's 24), the CLS row of that layer's
attention, head mean, patches only, summed over the layers (:func:`runtime.peer_math.vtc_cls.scores`);
each view keeps its ``round_half_up(keep_ratio · n)`` best patches in spatial order. The paper's
``token_num = 36`` of 576 is ``keep_ratio = 36/576`` (:data:`PAPER_RATIO`). ``start_layer``
defaults to the reference's 16 of 24 scaled to the encoder's depth (``round(16·depth/24)``,
at most ``depth − 2``), recorded in the recipe. Needs a CLS token. Writes no features.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from ... import prellm
from ...errors import RecipeError
from ...peer_math import vtc_cls as math_
from ...state import PerThread
from ...validation import short
from . import _vision
from .base import Stage, register_stage

PAPER_RATIO = math_.DEFAULT_TOKEN_NUM / 576
"""``token_num = 36`` of CLIP-L/336's 576 patches."""


def start_layer(depth: int, start: int | None) -> int:
    """The first summed layer: ``start`` or the reference's 16 of 24 scaled to ``depth``.

    Example:
        >>> start_layer(24, None), start_layer(2, None), start_layer(24, 20)
        (16, 0, 20)
    """
    if start is None:
        start = min(depth - 2, int(math.floor(16 * depth / 24 + 0.5)))
    math_.layer_range(depth, start)  # ValueError when it leaves no layer
    return start


@register_stage("vtc-cls")
class VtcCls(Stage):
    fixed_ratio = True
    signals = ("features", "encoder_patches")  # the CLS token, and encoder patches that are tokens (see Family.signals)
    statistic = "vtccls"
    probes = ("vtc_cls",)
    defaults = {"start_layer": None}
    score_params = ("start_layer",)
    _sum = PerThread()  # the running sum of the current vision forward

    def validate(self, params: dict, recipe: Any) -> None:
        if set(params) - {"start_layer"}:
            raise RecipeError(f"pre-LLM stage 'vtc-cls': unexpected pre_llm.params {short(sorted(set(params) - {'start_layer'}))} (only start_layer)")
        start = params.get("start_layer")
        if start is not None and (isinstance(start, bool) or not isinstance(start, int) or start < 0):
            raise RecipeError(f"pre-LLM stage 'vtc-cls': pre_llm.params.start_layer must be a non-negative integer or null, got {short(start)}")

    def check_model(self, model: Any, params: dict) -> None:
        from ...families import family_for

        start_layer(len(family_for(model).vision_layers(model)), params.get("start_layer"))

    def model_reason(self, model: Any, family: Any) -> str | None:
        return _vision.probe_reason(model, family, "VTC-CLS", writes=False)

    def probe_hooks(self, model: Any, family: Any, params: dict, record) -> list:
        depth = len(family.vision_layers(model))
        layers = list(math_.layer_range(depth, start_layer(depth, params.get("start_layer"))))

        def hook_for(layer: int):
            def on_attention(module: Any, x: torch.Tensor) -> None:
                row = _vision.cls_rows(module, x).mean(dim=1)  # (N, T): head mean
                self._sum = row if layer == layers[0] else self._sum + row
                if layer == layers[-1]:
                    record("vtc_cls", self._sum)
                    self._sum = None
            return on_attention

        return [_vision.on_attention_input(model, family, layer, hook_for(layer)) for layer in layers]

    def scores(self, view: Any, embeds: torch.Tensor | None, params: dict) -> torch.Tensor | None:
        context = getattr(view, "vision", None)
        if context is None or "vtc_cls" not in context.probes:
            return None
        rows = context.probe("vtc_cls")
        return rows[:, 1:].reshape(-1)[context.source.to(rows.device)].float().cpu()

    def keep(self, scores: torch.Tensor, keep_ratio: float | None, grid: tuple[int, int] | None, params: dict) -> torch.Tensor:
        return prellm._topk_mask(scores, prellm.stage_count(keep_ratio, scores.shape[0]))

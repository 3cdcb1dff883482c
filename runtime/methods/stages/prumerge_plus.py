"""PruMerge+ (42Shawn/LLaVA-PruMerge): IQR-outlier patches plus spatial samples, each merged with its key neighbours.

At the last vision layer, one head over the full width: ``cls_attn = softmax(q_CLS·kᵀ·C^−½)``
over the patches (:func:`runtime.peer_math.prumerge.cls_attention`). The count is dynamic: the
patches above ``Q3 + 1.5·IQR`` (``int(N·ratio)``, by attention), plus PruMerge+'s uniform samples
``arange(int(step/6), N − 1, int(step/3))``, ``step = int(1/ratio)``. Each kept token becomes its
feature-layer feature plus the attention-weighted sum of its 32 key-nearest patches, and one
summary token (the attention-weighted sum of the dropped patches) is added
(:func:`runtime.peer_math.prumerge.prumerge`). The features go through the model's projector and
are written in place of the kept placeholders.

Placement (ours; the reference shortens the sequence): each kept patch at its own position, the
summary token at the first free position of the view. The count follows from the image
(``fixed_ratio = False``); compiled at a budget, the in-LLM schedule does the rest. An image with
no outlier (the reference divides by zero) passes through unpruned. Per view (the reference's
quartiles span the batch). Needs a CLS token and a LLaVA-style ``multi_modal_projector``.
"""
from __future__ import annotations

from typing import Any

import torch

from ...errors import RecipeError, StageCannotRun
from ...peer_math import prumerge as math_
from ...peer_math._common import order_best_first
from ...validation import short
from . import _vision
from .base import Selection, Stage, register_stage


def kept_index(scores: torch.Tensor) -> torch.Tensor | None:
    """PruMerge+'s kept patches in its output order, ``None`` when there is no outlier (or too many)."""
    ratio = math_.outlier_ratio(scores)
    if ratio <= 0 or int(int(1 / ratio) / 3) < 1:
        return None
    n = scores.shape[0]
    top = order_best_first(scores)[: int(n * ratio)]
    samples = math_.spatial_samples(ratio, n)
    return torch.cat([top, samples[~torch.isin(samples, top)]])


@register_stage("prumerge-plus")
class PruMergePlus(Stage):
    fixed_ratio = False
    signals = ("features", "encoder_patches")  # the CLS token, and encoder patches that are tokens (see Family.signals)
    statistic = "prumerge"
    probes = ("pm_q", "pm_k", "pm_hidden")
    writes_features = True

    def validate(self, params: dict, recipe: Any) -> None:
        if params:
            raise RecipeError(f"pre-LLM stage 'prumerge-plus': unexpected pre_llm.params {short(sorted(params))} (it takes none)")

    def describe(self, spec: dict) -> str:
        return "keeps each image's IQR-outlier patches plus spatial samples (PruMerge+), merged, plus one summary token"

    def model_reason(self, model: Any, family: Any) -> str | None:
        return _vision.probe_reason(model, family, "PruMerge+", writes=True)

    def probe_hooks(self, model: Any, family: Any, params: dict, record) -> list:
        def on_attention(module: Any, x: torch.Tensor) -> None:
            q, k = _vision.clip_attention(module, x, width=True)
            record("pm_q", q[:, 0])  # (N, T, C)
            record("pm_k", k[:, 0])

        last = len(family.vision_layers(model)) - 1
        return [_vision.on_attention_input(model, family, last, on_attention),
                _vision.on_layer_output(model, family, _vision.feature_layer(model, family), lambda h: record("pm_hidden", h))]

    @staticmethod
    def _attention(context: Any) -> torch.Tensor:
        """(crops, P) each crop's CLS → patch attention, one full-width head."""
        q, k = context.probe("pm_q"), context.probe("pm_k")
        return torch.stack([math_.cls_attention(q[c], k[c]) for c in range(q.shape[0])])

    def scores(self, view: Any, embeds: torch.Tensor | None, params: dict) -> torch.Tensor | None:
        context = getattr(view, "vision", None)
        if context is None or "pm_q" not in context.probes:
            return None
        attention = self._attention(context)
        return attention.reshape(-1)[context.source.to(attention.device)].float().cpu()

    def keep(self, scores: torch.Tensor, keep_ratio: float | None, grid: tuple[int, int] | None, params: dict) -> torch.Tensor:
        n = scores.shape[0]
        index = kept_index(scores.cpu())
        mask = torch.zeros(n, dtype=torch.bool)
        if index is None:
            mask[:] = True
            return mask
        mask[index] = True
        free = torch.nonzero(~mask).flatten()
        if free.numel():
            mask[free[0]] = True  # the summary token's slot
        return mask

    def select(self, view: Any, embeds: torch.Tensor | None, keep_ratio: float | None, params: dict) -> Selection:
        context = getattr(view, "vision", None)
        if context is None or context.project is None:
            raise StageCannotRun("PruMerge+'s vision probes or the model's projector did not reach this view")
        attention = self._attention(context)
        source = context.source.to(attention.device)
        scores = attention.reshape(-1)[source]
        keep = self.keep(scores.float().cpu(), None, None, params)
        if bool(keep.all()):
            return Selection(keep)
        hidden = context.probe("pm_hidden")[:, 1:].reshape(-1, context.probe("pm_hidden").shape[-1])[source]
        keys = context.probe("pm_k")[:, 1:].reshape(-1, context.probe("pm_k").shape[-1])[source]
        merged = math_.prumerge(hidden, keys, scores, plus=True)
        index = merged.index.cpu()
        summary = torch.nonzero(keep & ~torch.isin(torch.arange(keep.numel()), index)).flatten()  # its slot
        where = torch.cat([index, summary])
        weight = next(context.project.parameters(), None)
        projected = context.project(merged.features.to(weight.dtype) if weight is not None else merged.features)
        order = torch.argsort(where)  # the kept tokens in view order
        return Selection(keep, projected[order.to(projected.device)])

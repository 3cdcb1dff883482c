"""VisionZip (dvlab-research/VisionZip): dominant tokens by CLS attention, plus merged contextual tokens.

At the vision layer the model's image features come from (``hidden_states[-2]`` on LLaVA, the
reference's ``attentions[-2]``), per crop: the CLS row of that layer's attention summed over heads
picks ``dominant − 1`` patches (CLS itself is kept too); the rest are merged by head-mean key
similarity into ``contextual`` targets at a uniform stride, each target becoming its own hidden
state plus the mean of the tokens assigned to it (:func:`runtime.peer_math.visionzip.visionzip`).
The ``dominant + contextual`` features go through the model's projector and are *written* in
place of the kept placeholders (``Selection.features``).

Placement (ours; the reference just shortens the sequence): a dominant patch stays at its own
position, a contextual token at its target's position, and the CLS token takes the first
position of the crop that neither uses. So the kept positions follow from the CLS attention
alone, and the compiler's survivors (:meth:`VisionZip.keep`) are the runtime's.

Counts: a view keeps ``k = round_half_up(keep_ratio · n)`` tokens (CLS included), of which
``round_half_up(k · contextual_share)`` are contextual; ``contextual_share = 10/64`` is the
papers' split at every setting (54+10, 108+20, 162+30; LLaVA-NeXT per crop 108+20, 54+10, 27+5).
The paper settings are keep ratios: :data:`PAPER_RATIOS`. A view with tokens of several crops
(LLaVA-NeXT's high-resolution view) shares its ``k`` among them in proportion to their tokens
(largest remainders), each crop zipped on its own tokens; the compiler's survivors for such a view
rank it as one unit (same count, an approximation of the set).

Needs a CLS token (the family's ``"features"`` signal) and a LLaVA-style ``multi_modal_projector``.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from ... import prellm
from ...errors import RecipeError, StageCannotRun
from ...peer_math import visionzip as math_
from ...validation import is_number, short
from . import _vision
from .base import Selection, Stage, register_stage

CONTEXTUAL_SHARE = 10 / 64
"""The papers' contextual share of the kept tokens (10 of 64, 20 of 128, 30 of 192; 5 of 32)."""

PAPER_RATIOS = {
    "llava-1.5": {64: 64 / 576, 128: 128 / 576, 192: 192 / 576},
    "llava-next (per crop)": {128: 128 / 576, 64: 64 / 576, 32: 32 / 576},
}
"""The papers' settings as keep ratios of a 576-patch crop (``--pre-llm-ratio``); the README uses 64 (54+10)."""


def split(k: int, share: float) -> tuple[int, int]:
    """``(dominant incl. CLS, contextual)`` of ``k`` kept tokens.

    Example:
        >>> split(64, 10 / 64), split(128, 10 / 64), split(1, 10 / 64)
        ((54, 10), (108, 20), (1, 0))
    """
    if k <= 0:
        return 0, 0
    contextual = min(k - 1, int(math.floor(k * share + 0.5)))
    return k - contextual, contextual


def shares(k: int, sizes: list[int]) -> list[int]:
    """``k`` split over groups of ``sizes`` tokens in proportion (largest remainders, earlier first on ties).

    Example:
        >>> shares(10, [6, 6, 3])
        [4, 4, 2]
    """
    total = sum(sizes)
    if total == 0:
        return [0] * len(sizes)
    exact = [k * s / total for s in sizes]
    out = [int(math.floor(e)) for e in exact]
    order = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - out[i]), i))
    for i in order[: k - sum(out)]:
        out[i] += 1
    return out


def slots(scores: torch.Tensor, dominant: int, contextual: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Where one crop's VisionZip tokens go: (dominant patches, contextual targets, the CLS slot).

    Args:
        scores: (n,) the crop's CLS → patch attention (summed over heads), in token order.
        dominant: dominant tokens including CLS; ``contextual``: merged tokens.

    Returns:
        Token indices of the dominant patches (ascending) and of the targets (output order), and
        the first index neither uses (the CLS token's), ``-1`` when ``dominant == 0``.
    """
    n = scores.shape[0]
    if dominant == 0:
        empty = torch.empty(0, dtype=torch.long)
        return empty, empty, -1
    top = prellm._topk_mask(scores, dominant - 1).cpu()
    remaining = torch.nonzero(~top).flatten()
    targets = torch.empty(0, dtype=torch.long)
    if contextual:
        step = max(1, remaining.numel() // contextual)
        targets = remaining[torch.arange(0, remaining.numel(), step)[:contextual]]
    used = top.clone()
    used[targets] = True
    free = torch.nonzero(~used).flatten()
    return torch.nonzero(top).flatten(), targets, int(free[0]) if free.numel() else -1


@register_stage("visionzip")
class VisionZip(Stage):
    fixed_ratio = True
    signals = ("features", "encoder_patches")  # the CLS token, and encoder patches that are tokens: families without them refuse it with their reason
    statistic = "visionzip"
    probes = ("vz_cls", "vz_keys", "vz_hidden")
    writes_features = True
    defaults = {"contextual_share": CONTEXTUAL_SHARE}
    selection_params = ("contextual_share",)

    def validate(self, params: dict, recipe: Any) -> None:
        if set(params) - {"contextual_share"}:
            raise RecipeError(f"pre-LLM stage 'visionzip': unexpected pre_llm.params {short(sorted(set(params) - {'contextual_share'}))} (only contextual_share)")
        share = params.get("contextual_share", CONTEXTUAL_SHARE)
        if not is_number(share) or not 0 <= share < 1:
            raise RecipeError(f"pre-LLM stage 'visionzip': pre_llm.params.contextual_share must be a number in [0, 1), got {short(share)}")

    def describe(self, spec: dict) -> str:
        share = (spec.get("params") or {}).get("contextual_share", CONTEXTUAL_SHARE)
        return f"keeps {spec.get('keep_ratio', 1.0):g} of each image's tokens as VisionZip dominant + contextual ({share:g} contextual), merged"

    def model_reason(self, model: Any, family: Any) -> str | None:
        return _vision.probe_reason(model, family, "VisionZip", writes=True)

    def probe_hooks(self, model: Any, family: Any, params: dict, record) -> list:
        layer = _vision.feature_layer(model, family)

        def on_attention(module: Any, x: torch.Tensor) -> None:
            q, k = _vision.clip_attention(module, x)
            scale = getattr(module, "scale", q.shape[-1] ** -0.5)
            rows = torch.softmax((q[:, :, :1] @ k.transpose(-1, -2)) * scale, dim=-1)[:, :, 0]  # (N, H, T)
            record("vz_cls", rows.sum(dim=1))  # summed over heads, as the reference
            record("vz_keys", k.mean(dim=1))  # the reference's metric: keys averaged over heads

        return [_vision.on_attention_input(model, family, layer, on_attention),
                _vision.on_layer_output(model, family, layer, lambda h: record("vz_hidden", h))]

    def scores(self, view: Any, embeds: torch.Tensor | None, params: dict) -> torch.Tensor | None:
        context = getattr(view, "vision", None)
        if context is None or "vz_cls" not in context.probes:
            return None
        cls = context.probe("vz_cls")
        return cls[:, 1:].reshape(-1)[context.source.to(cls.device)].float().cpu()

    def keep(self, scores: torch.Tensor, keep_ratio: float | None, grid: tuple[int, int] | None, params: dict) -> torch.Tensor:
        n = scores.shape[0]
        dominant, contextual = split(prellm.stage_count(keep_ratio, n), params.get("contextual_share", CONTEXTUAL_SHARE))
        patches, targets, cls = slots(scores.cpu(), dominant, contextual)
        mask = torch.zeros(n, dtype=torch.bool)
        mask[patches] = True
        mask[targets] = True
        if cls >= 0:
            mask[cls] = True
        return mask

    def select(self, view: Any, embeds: torch.Tensor | None, keep_ratio: float | None, params: dict) -> Selection:
        context = getattr(view, "vision", None)
        if context is None:
            raise StageCannotRun("VisionZip's vision probes did not reach this view")
        if context.project is None:
            raise StageCannotRun("VisionZip needs the model's projector")
        share = params.get("contextual_share", CONTEXTUAL_SHARE)
        cls, keys, hidden = context.probe("vz_cls"), context.probe("vz_keys"), context.probe("vz_hidden")
        n = context.source.numel()
        crops = context.crops()
        counts = shares(prellm.stage_count(keep_ratio, n), [index.numel() for _, index, _ in crops])
        slot_parts, feature_parts = [], []
        for (crop, index, patch), k in zip(crops, counts):
            dominant, contextual = split(k, share)
            if dominant == 0:
                continue
            seq = torch.cat([torch.zeros(1, dtype=torch.long), patch + 1]).to(hidden.device)  # CLS, then the crop's tokens here
            zipped = math_.visionzip(hidden[crop, seq][None], cls[crop, seq][None, None], keys[crop, seq][None], dominant, contextual)
            patches, targets, cls_slot = slots(cls[crop, seq[1:]].float().cpu(), dominant, contextual)
            if not torch.equal(zipped.dominant_index[0, 1:].cpu() - 1, patches) or not torch.equal(zipped.contextual_index[0].cpu() - 1, targets):
                raise RuntimeError("VisionZip's selection differs from its placement")  # one tie rule for both
            local = torch.cat([torch.tensor([cls_slot]), patches, targets])  # the reference's order: CLS, dominant, contextual
            slot_parts.append(index[local])
            feature_parts.append(zipped.features[0])
        keep = torch.zeros(n, dtype=torch.bool)
        if not slot_parts:
            return Selection(keep)
        where = torch.cat(slot_parts)
        merged = torch.cat(feature_parts)
        weight = next(context.project.parameters(), None) if hasattr(context.project, "parameters") else None
        projected = context.project(merged.to(weight.dtype) if weight is not None else merged)
        keep[where] = True
        order = torch.argsort(where)  # the kept tokens in view order
        return Selection(keep, projected[order.to(projected.device)])

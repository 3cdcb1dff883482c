"""PruMerge and PruMerge+ (42Shawn/LLaVA-PruMerge): an IQR-outlier count of CLS-attended patches,
(+: plus uniformly spaced samples), each kept token absorbing its key-nearest neighbours.

Reference (docs/methods.md, PruMerge; ``llava/model/multimodal_encoder/clip_encoder.py``
``token_prune_merge_advanced`` / ``token_prune_merge_advanced_plus``, ``outlier_dectection``):

* ``q``, ``k`` = the **last** encoder layer's ``q_proj`` / ``k_proj`` outputs (layer 23 of
  CLIP-L, full width ``C``, one head); ``cls_attn = softmax(q·kᵀ·C^−½)[CLS, patches]``;
* ratio = share of ``cls_attn`` above ``Q3 + 1.5·IQR`` (numpy's linear percentiles);
  keep ``int(N·ratio)`` patches by attention (largest first: the **output order**);
* PruMerge+ adds ``arange(int(step/6), N − 1, int(step/3))`` with ``step = int(1/ratio)``
  (the reference writes 575 for ``N − 1``), those not already kept, in ascending order;
* each kept token ``i``: among all other patches (the other kept ones first, in output order,
  then the rest in position order) the 32 with the most cosine-similar keys; new feature =
  ``x_i + Σ_j cls_attn_j·x_j`` over them (not normalised); one extra token
  ``Σ_{not kept} cls_attn_j·x_j`` is appended. Features are the feature layer's
  (``hidden_states[-2]``, patches), before the projector.

Deviations: per image (the reference computes the quartiles over the whole batch); ties go to
the earlier position (in the order above); no outlier (ratio 0) or ``step < 3`` for PruMerge+
is refused with a ValueError (the reference divides by zero / calls ``arange`` with step 0);
fewer than 32 other patches → all of them.

Example:
    >>> import torch
    >>> torch.manual_seed(0) and None
    >>> attn = torch.softmax(torch.randn(64) * 3, 0)
    >>> out = prumerge(torch.randn(64, 8), torch.randn(64, 8), attn, plus=True)
    >>> out.features.shape[0] == out.index.numel() + 1
    True
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._common import check_count, order_best_first

__all__ = ["NEIGHBOURS", "PruMergeResult", "cls_attention", "outlier_ratio", "outlier_count", "spatial_samples", "prumerge"]

NEIGHBOURS = 32


@dataclass(frozen=True)
class PruMergeResult:
    """What :func:`prumerge` returns for one image.

    Attributes:
        index: (n_keep,) kept patch indices (0…N−1) in the reference's output order (outliers by
            descending attention, then PruMerge+'s samples ascending).
        features: (n_keep + 1, C) the merged features of the kept tokens, then the extra token.
    """

    index: torch.Tensor
    features: torch.Tensor


def cls_attention(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """(N,) ``softmax(q·kᵀ·C^−½)`` of the CLS row, patch columns (single head over the full width).

    Args:
        query, key: (N + 1, C) the last encoder layer's ``q_proj`` / ``k_proj`` outputs, CLS first.
    """
    if query.ndim != 2 or key.shape != query.shape:
        raise ValueError(f"query {tuple(query.shape)} and key {tuple(key.shape)} must both be (N + 1, C)")
    logits = (query.float()[0] @ key.float().T) * query.shape[1] ** -0.5
    return torch.softmax(logits, dim=0)[1:]


def outlier_ratio(cls_attn: torch.Tensor) -> float:
    """Share of values above ``Q3 + 1.5·IQR`` (quartiles by linear interpolation, as numpy's default)."""
    x = cls_attn.detach().double().flatten()
    if x.numel() == 0:
        raise ValueError("cls_attn is empty")
    q1, q3 = torch.quantile(x, 0.25).item(), torch.quantile(x, 0.75).item()
    return int((x > q3 + 1.5 * (q3 - q1)).sum()) / x.numel()


def outlier_count(cls_attn: torch.Tensor) -> int:
    """``int(N·ratio)``: the patches PruMerge keeps by attention (the reference's float product)."""
    return int(cls_attn.numel() * outlier_ratio(cls_attn))


def spatial_samples(ratio: float, n: int) -> torch.Tensor:
    """PruMerge+'s uniform samples: ``arange(int(step/6), n − 1, int(step/3))``, ``step = int(1/ratio)``."""
    if not ratio > 0:
        raise ValueError("PruMerge+ needs at least one IQR outlier (ratio > 0); the reference divides by it")
    step = int(1 / ratio)
    if int(step / 3) < 1:
        raise ValueError(f"ratio={ratio:g} gives a sample step of {step} < 3; PruMerge+'s spacing int(step/3) would be 0")
    return torch.arange(int(step / 6), n - 1, int(step / 3))


def prumerge(
    features: torch.Tensor, keys: torch.Tensor, cls_attn: torch.Tensor, plus: bool = True, neighbours: int = NEIGHBOURS
) -> PruMergeResult:
    """PruMerge(+) for one image.

    Args:
        features: (N, C) the feature layer's patch features (no CLS).
        keys: (N, C) or (N + 1, C) the last layer's ``k_proj`` outputs (a leading CLS row is dropped).
        cls_attn: (N,) :func:`cls_attention`.
        plus: PruMerge+ (spatial samples) or plain PruMerge.
        neighbours: neighbours merged into each kept token (32).
    """
    if features.ndim != 2 or cls_attn.shape != (features.shape[0],):
        raise ValueError(f"features {tuple(features.shape)} and cls_attn {tuple(cls_attn.shape)} must be (N, C) and (N,)")
    N = features.shape[0]
    k = keys[1:] if keys.shape[0] == N + 1 else keys
    if k.shape[0] != N:
        raise ValueError(f"keys {tuple(keys.shape)} must be (N, C) or (N + 1, C) with N = {N}")
    check_count(neighbours, 1 << 30, "neighbours")
    ratio = outlier_ratio(cls_attn)
    top = order_best_first(cls_attn)[: int(N * ratio)]
    index = top
    if plus:
        samples = spatial_samples(ratio, N).to(top.device)
        index = torch.cat([top, samples[~torch.isin(samples, top)]])
    kept = torch.zeros(N, dtype=torch.bool, device=features.device)
    kept[index] = True
    others = torch.nonzero(~kept).flatten()  # ascending
    work = torch.float64 if features.dtype == torch.float64 else torch.float32  # float32 at least
    x, a = features.to(work), cls_attn.to(work)
    unit = torch.nn.functional.normalize(k.to(work), p=2, dim=-1)
    merged = torch.empty(index.numel(), features.shape[1], dtype=work, device=features.device)
    for i in range(index.numel()):
        rest = torch.cat([index[:i], index[i + 1:], others])
        similarity = unit[rest] @ unit[index[i]]
        near = rest[order_best_first(similarity)[: min(neighbours, rest.numel())]]
        merged[i] = x[index[i]] + (x[near] * a[near, None]).sum(dim=0)
    extra = (x[others] * a[others, None]).sum(dim=0, keepdim=True)
    return PruMergeResult(index, torch.cat([merged, extra]).to(features.dtype))

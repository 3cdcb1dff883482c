"""Shared checks and the deterministic top-k every peer method uses (ties: earlier position wins)."""
from __future__ import annotations

import math

import torch


def as_batch(x: torch.Tensor, name: str, ndim: int) -> tuple[torch.Tensor, bool]:
    """``x`` with a leading batch axis (added if ``x`` has ``ndim − 1`` axes) and whether it was added."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim == ndim - 1:
        return x.unsqueeze(0), True
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim - 1} or {ndim} dimensions (batch first), got shape {tuple(x.shape)}")
    return x, False


def check_count(k, available: int, name: str = "k") -> int:
    """An integer in ``[0, available]``, else ValueError naming the value and the range."""
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= available:
        raise ValueError(f"{name}={k!r} is out of range; it must be an integer in [0, {available}]")
    return k


def check_ratio(r, name: str, low: float = 0.0, high: float = 1.0) -> float:
    """A finite float in ``[low, high]``, else ValueError."""
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(float(r)) or not low <= float(r) <= high:
        raise ValueError(f"{name}={r!r} is out of range; it must be a number in [{low:g}, {high:g}]")
    return float(r)


def round_half_up(x: float) -> int:
    """``floor(x + 0.5)``: the project's rounding (Python's ``round`` rounds half to even)."""
    return int(math.floor(x + 0.5))


def work_dtype(x: torch.Tensor) -> torch.dtype:
    """float32, or float64 for float64 inputs: scores are never computed below float32."""
    return torch.promote_types(x.dtype, torch.float32)


def order_best_first(scores: torch.Tensor, eligible: torch.Tensor | None = None) -> torch.Tensor:
    """Indices sorting the last axis best first: descending score, ties by ascending position.

    Ineligible entries and NaN scores come last (in position order). Compared in float32 at least
    (float64 scores stay float64).
    """
    s = scores.detach()
    s = torch.nan_to_num(s.to(torch.promote_types(s.dtype, torch.float32)), nan=-math.inf)
    if eligible is not None:
        s = torch.where(eligible, s, torch.full_like(s, -math.inf))
    return torch.sort(s, dim=-1, descending=True, stable=True).indices


def top_k_mask(scores: torch.Tensor, k: int | torch.Tensor, eligible: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask of the ``k`` best eligible entries of each row of ``scores`` (B, N).

    Args:
        scores: (B, N) scores, higher is better.
        k: keep count, an int or a (B,) integer tensor; clamped to the eligible count of the row.
        eligible: optional (B, N) bool mask of the entries that may be kept.

    Returns:
        (B, N) bool, True at the kept entries (their original order is the order of the mask).
    """
    B, N = scores.shape
    if eligible is None:
        eligible = torch.ones_like(scores, dtype=torch.bool)
    order = order_best_first(scores, eligible)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(N, device=order.device).expand(B, N))
    kk = torch.as_tensor(k, device=scores.device).reshape(-1).expand(B) if not isinstance(k, int) else torch.full((B,), k, device=scores.device)
    limit = torch.minimum(kk.long(), eligible.sum(dim=1))
    return (rank < limit[:, None]) & eligible

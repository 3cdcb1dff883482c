"""Run-time selection at a pruning layer (METHODS.md §3): the top visual tokens by a scorer's scores.

The scorers themselves are :mod:`runtime.methods.scorers`; :func:`keep_top` keeps the best-scored
tokens (ties by position: earlier tokens go first), and :func:`fitprune_scores` is FitPrune's
reference formula on one layer's full attention (the conformance entry point).
"""
from __future__ import annotations

import torch


def fitprune_scores(attn_weights: torch.Tensor, visual_start: int, n_visual: int) -> torch.Tensor:
    """FitPrune's run-time score of each visual token from one layer's full attention.

    ``score_j = (Σ_{q ≥ start+v} A[q, start+j]) · (Σ_{start ≤ q < start+v} A[q, start+j] / v)``,
    with ``A`` the max over heads of the post-softmax attention. The smallest scores are dropped.

    Args:
        attn_weights: (B, H, n, n) post-softmax attention of one layer (prefill).
        visual_start: position of the first visual token.
        n_visual: number of visual tokens.

    Returns:
        (n_visual,) for B == 1, else (B, n_visual); float32.

    Example:
        >>> a = torch.softmax(torch.randn(1, 2, 8, 8), -1)
        >>> fitprune_scores(a, 2, 3).shape
        torch.Size([3])
    """
    head_max = attn_weights.float().amax(dim=1)  # (B, n, n)
    end = visual_start + n_visual
    columns = head_max[:, :, visual_start:end]
    text = columns[:, end:, :].sum(dim=1)
    visual = columns[:, visual_start:end, :].sum(dim=1) / n_visual
    scores = text * visual
    return scores[0] if scores.shape[0] == 1 else scores


def keep_top(scores: torch.Tensor, visual: torch.Tensor, n_keep: torch.Tensor) -> torch.Tensor:
    """Boolean (B, L): the ``n_keep[b]`` highest-scoring visual tokens of each row.

    Ties go by position: among equal scores, earlier tokens are dropped first (a stable ascending
    sort, dropping from the front), so the choice never depends on the sort implementation.
    """
    masked = torch.where(visual, scores.float(), torch.full_like(scores, float("-inf"), dtype=torch.float32))
    order = torch.sort(masked, dim=1, stable=True).indices  # ascending: non-visual (-inf) first
    n_drop = visual.sum(dim=1) - n_keep.clamp(min=0)
    n_non_visual = (~visual).sum(dim=1)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    dropped = (rank >= n_non_visual[:, None]) & (rank < (n_non_visual + n_drop.clamp(min=0))[:, None])
    return visual & ~dropped

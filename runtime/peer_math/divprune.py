"""DivPrune (vbdi/divprune, CVPR 2025; CC BY-NC — reimplemented from the paper and the ports, not
copied): greedy max–min diversity on the language model's input embeddings.

Reference (docs/methods.md, DivPrune): on the image tokens' LLM input embeddings (projected
features), distance ``1 − cos``; the first pick is the token whose nearest neighbour is farthest
(the column's second-smallest distance, its own being the smallest); each next pick maximises
the distance to the nearest token already picked; ``round(ratio·n)`` picks, ratio 0.098 by
default (``SUBSET_RATIO``); the kept tokens are fed in position order.

Deviations: distances in float32 at least (the reference uses the model's dtype); a token already picked
is never picked again (the reference could repeat one when all remaining distances are 0:
exact duplicates); ties go to the earlier position (``torch.argmax``'s first maximum: the same);
batched. LLaVA-NeXT's row-end newlines are never candidates (the runtime protects them).

Example:
    >>> import torch
    >>> x = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    >>> order, keep = divprune(x, 2)
    >>> order.tolist(), keep.tolist()
    ([3, 0], [True, False, False, True])
"""
from __future__ import annotations

import torch

from ._common import as_batch, check_count, check_ratio, work_dtype

__all__ = ["DEFAULT_RATIO", "keep_count", "distances", "divprune"]

DEFAULT_RATIO = 0.098
"""SUBSET_RATIO: the share of image tokens kept (the README's default)."""


def keep_count(n_visual: int, ratio: float = DEFAULT_RATIO) -> int:
    """Image tokens DivPrune keeps: ``int(round(ratio·n))`` (Python's round, half to even).

    Example:
        >>> keep_count(576), keep_count(2880)
        (56, 282)
    """
    check_count(n_visual, 1 << 62, "n_visual")
    return int(round(check_ratio(ratio, "ratio") * n_visual))


def distances(features: torch.Tensor) -> torch.Tensor:
    """(B, N, N) cosine distance ``1 − x̂ᵢ·x̂ⱼ`` (float32, or float64 for float64 features)."""
    x, _ = as_batch(features, "features", 3)
    x = x.to(work_dtype(x))
    unit = x / x.norm(dim=-1, keepdim=True)
    return 1.0 - unit @ unit.transpose(1, 2)


def divprune(features: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DivPrune's greedy selection of ``k`` tokens per image.

    Args:
        features: (B, N, D) or (N, D) the image tokens' input embeddings.
        k: tokens to keep, in ``[0, N]`` (e.g. :func:`keep_count`).

    Returns:
        ``(order, keep)``: (B, k) indices in pick order, and the (B, N) bool keep mask
        (position order is the mask's order).
    """
    x, single = as_batch(features, "features", 3)
    B, N, _ = x.shape
    check_count(k, N, "k")
    dist = distances(x)
    order = torch.empty(B, k, dtype=torch.long, device=x.device)
    picked = torch.zeros(B, N, dtype=torch.bool, device=x.device)
    nearest = None  # (B, N): distance of each token to the nearest picked one
    rows = torch.arange(B, device=x.device)
    for i in range(k):
        if i == 0:
            score = dist.topk(2, dim=1, largest=False).values[:, 1] if N > 1 else torch.zeros(B, N, device=x.device)
        else:
            score = nearest
        score = score.masked_fill(picked, float("-inf"))
        choice = score.argmax(dim=1)
        order[:, i] = choice
        picked[rows, choice] = True
        row = dist[rows, choice]  # (B, N) distances from the new pick
        nearest = row if nearest is None else torch.minimum(nearest, row)
    return (order[0], picked[0]) if single else (order, picked)

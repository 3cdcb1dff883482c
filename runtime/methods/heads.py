"""Head reductions: how a scorer combines the attention heads' post-softmax rows (``HEAD_REDUCTIONS``).

Each entry maps ``(B, H, rows, keys)`` probabilities to ``(B, rows, keys)``; ``dim`` names the head
dimensions when they are laid out otherwise (the probe's GQA groups: ``(1, 3)`` of
``(B, KV, rows, G, keys)``). They are one line each, so they share this module; a new one is one
more registered function.

Example:
    >>> import torch
    >>> HEAD_REDUCTIONS["max"](torch.tensor([[[[0.2, 0.8]], [[0.6, 0.4]]]])).tolist()
    [[[0.6000000238418579, 0.800000011920929]]]
"""
from __future__ import annotations

import torch

from ..registry import Registry

HEAD_REDUCTIONS = Registry("head reduction")


def _one_dim_at_a_time(reduction, probs: torch.Tensor, dim: int | tuple) -> torch.Tensor:
    # Over non-adjacent dims torch runs a generic kernel ~20x slower; nested, each pass is vectorised
    # (and a max of maxes, a mean of equal-sized means, is the same reduction).
    for d in sorted(dim if isinstance(dim, tuple) else (dim,), reverse=True):
        probs = reduction(probs, d)
    return probs


@HEAD_REDUCTIONS.register("max")
def head_max(probs: torch.Tensor, dim: int | tuple = 1) -> torch.Tensor:
    """The largest probability over heads (FitPrune)."""
    return _one_dim_at_a_time(torch.amax, probs, dim)


@HEAD_REDUCTIONS.register("mean")
def head_mean(probs: torch.Tensor, dim: int | tuple = 1) -> torch.Tensor:
    """The mean probability over heads (FastV, PyramidDrop)."""
    return _one_dim_at_a_time(torch.mean, probs, dim)

"""Head reductions: how a scorer combines the attention heads' post-softmax rows (``HEAD_REDUCTIONS``).

Each entry maps ``(B, H, rows, keys)`` probabilities to ``(B, rows, keys)``. They are one line
each, so they share this module; a new one is one more registered function.

Example:
    >>> import torch
    >>> HEAD_REDUCTIONS["max"](torch.tensor([[[[0.2, 0.8]], [[0.6, 0.4]]]])).tolist()
    [[[0.6000000238418579, 0.800000011920929]]]
"""
from __future__ import annotations

import torch

from ..registry import Registry

HEAD_REDUCTIONS = Registry("head reduction")


@HEAD_REDUCTIONS.register("max")
def head_max(probs: torch.Tensor) -> torch.Tensor:
    """The largest probability over heads (FitPrune)."""
    return probs.amax(dim=1)


@HEAD_REDUCTIONS.register("mean")
def head_mean(probs: torch.Tensor) -> torch.Tensor:
    """The mean probability over heads (FastV, PyramidDrop)."""
    return probs.mean(dim=1)

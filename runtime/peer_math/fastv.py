"""FastV (pkunlp-icler/FastV): one cut at decoder layer K, ranked by the last prompt token.

Reference (docs/methods.md, FastV): entering layer ``K`` (2 by default; the paper also runs 3),
take layer ``K − 1``'s post-softmax attention, **mean over heads**, the row of the last prompt
token, restricted to the image tokens; keep the top ``(1 − R)`` share of the image tokens
(``R`` = 50 % or 75 % in the paper), drop the rest for every later layer. Kept tokens keep their
original positions (the repository's KV-cache version sets ``position_ids = keep_indexs``).

Deviations: the count is ``round_half_up(n·(1 − R))`` (the repository's KV-cache version floors
``int(576·ratio)``, LightCompress rounds half to even; they agree at the paper settings); ties go
to the earlier position (``torch.topk`` leaves them unspecified); any batch size (the reference
reads batch row 0 only).

Example:
    >>> import torch
    >>> attn = torch.softmax(torch.randn(1, 4, 10), dim=-1)   # (B, heads, keys): the last query's row
    >>> visual = torch.zeros(1, 10, dtype=torch.bool); visual[0, 2:8] = True
    >>> keep = select(scores(attn), visual, keep_count(6, 0.5))
    >>> int(keep.sum()), bool((keep & ~visual).any())
    (3, False)
"""
from __future__ import annotations

import torch

from ._common import as_batch, check_count, check_ratio, round_half_up, top_k_mask, work_dtype

__all__ = ["DEFAULT_LAYER", "DEFAULT_DROP_RATIO", "PAPER_SETTINGS", "keep_count", "scores", "select"]

DEFAULT_LAYER = 2
"""K: the cut happens on entry to this decoder layer (scored by layer K − 1's attention)."""
DEFAULT_DROP_RATIO = 0.5
"""R: the share of image tokens dropped."""
PAPER_SETTINGS = (
    {"layer": 2, "drop_ratio": 0.5},
    {"layer": 2, "drop_ratio": 0.75},
    {"layer": 3, "drop_ratio": 0.5},
    {"layer": 3, "drop_ratio": 0.75},
)
"""(K, R) pairs of the paper and README (K = 2 is the repository default)."""


def keep_count(n_visual: int, drop_ratio: float = DEFAULT_DROP_RATIO) -> int:
    """Image tokens FastV keeps: ``round_half_up(n_visual·(1 − R))``.

    Example:
        >>> keep_count(576, 0.5), keep_count(576, 0.75)
        (288, 144)
    """
    check_count(n_visual, 1 << 62, "n_visual")
    R = check_ratio(drop_ratio, "drop_ratio")
    return round_half_up(n_visual * (1.0 - R))


def scores(last_row: torch.Tensor) -> torch.Tensor:
    """Head-mean attention of the last prompt token: (B, H, K) → (B, K) float32 (also (H, K) → (K,)).

    Args:
        last_row: post-softmax attention of the last prompt token over all keys, per head, of
            layer ``K − 1``.
    """
    x, single = as_batch(last_row, "last_row", 3)
    out = x.to(work_dtype(x)).mean(dim=1)
    return out[0] if single else out


def select(scores: torch.Tensor, visual: torch.Tensor, n_keep: int | torch.Tensor) -> torch.Tensor:
    """(B, L) bool: the ``n_keep`` best visual tokens of each row (ties: the earlier position).

    Args:
        scores: (B, L) per-key scores, e.g. :func:`scores` of the whole key axis.
        visual: (B, L) bool, the image tokens that may be dropped.
        n_keep: tokens to keep per row (int, or (B,) tensor); clamped to the row's visual count.
    """
    s, single = as_batch(scores, "scores", 2)
    v, _ = as_batch(visual, "visual", 2)
    if v.shape != s.shape:
        raise ValueError(f"visual {tuple(v.shape)} must have the shape of scores {tuple(s.shape)}")
    out = top_k_mask(s, n_keep, v.bool())
    return out[0] if single else out

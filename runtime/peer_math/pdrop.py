"""PyramidDrop (Cooperx521/PyramidDrop): stages of ``int(n·λ^s)`` survivors, ranked by the
pruning layer's own attention of the last instruction token.

Reference (docs/methods.md, PyramidDrop): ``layer_list = [8, 16, 24]`` of LLaVA-1.5's 32 layers,
``image_token_ratio_list = [λ, λ², λ³]`` with ``λ = 0.5`` (``1.0`` is prepended). After layer
``l − 1`` runs, the hidden states go through layer ``l``'s ``input_layernorm``, ``q_proj``,
``k_proj`` and RoPE at the current positions; the last instruction token's query attends (causal
softmax in float32) to every key; mean over heads; the image columns' top
``int(n_image·ratio[s])`` survive (``n_image`` = the image's original count), sorted back into
position order.

Deviations: positions are **kept** (the reference re-indexes the survivors 0…n−1 and shifts decode
positions); grouped-query attention repeats the key heads (the reference's matmul assumes as many
key as query heads); ties go to the earlier position; stage layers for other depths are
``s·L // 4`` (8/16/24 at L = 32).

Example:
    >>> stage_layers(32), stage_counts(576)
    ((8, 16, 24), [576, 288, 144, 72])
"""
from __future__ import annotations

import math

import torch

from ._common import as_batch, check_count, check_ratio
from .fastv import select

__all__ = ["DEFAULT_LAMBDA", "REFERENCE_LAYERS", "stage_layers", "stage_counts", "last_token_scores", "select"]

DEFAULT_LAMBDA = 0.5
REFERENCE_LAYERS = (8, 16, 24)
"""The reference's stage layers for a 32-layer language model."""


def stage_layers(num_layers: int, stages: int = 3) -> tuple[int, ...]:
    """The decoder layers on whose entry each stage cuts: ``s·L // (stages + 1)`` for s = 1…stages.

    Example:
        >>> stage_layers(40), stage_layers(8)
        ((10, 20, 30), (2, 4, 6))
    """
    check_count(num_layers, 1 << 20, "num_layers")
    check_count(stages, max(num_layers - 1, 0), "stages")  # then the layers are distinct and >= 1
    return tuple(s * num_layers // (stages + 1) for s in range(1, stages + 1))


def stage_counts(n_visual: int, lam: float = DEFAULT_LAMBDA, stages: int = 3) -> list[int]:
    """Image tokens alive in each stage: ``[n, int(n·λ), int(n·λ²), …]`` (the reference's rule).

    Example:
        >>> stage_counts(576, 0.4)
        [576, 230, 92, 36]
    """
    check_count(n_visual, 1 << 62, "n_visual")
    lam = check_ratio(lam, "lam")
    return [n_visual] + [int(n_visual * lam**s) for s in range(1, stages + 1)]


def last_token_scores(
    query: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor | None = None, scaling: float | None = None
) -> torch.Tensor:
    """Head-mean attention of one query (the last instruction token) over all keys.

    ``softmax(q·kᵀ·scaling + mask)`` in float32 per head, then the mean over heads.

    Args:
        query: (B, H, D) the last instruction token's query, after RoPE, of the pruning layer.
        keys: (B, H_kv, L, D) that layer's keys for the whole sequence, after RoPE; ``H`` must be a
            multiple of ``H_kv`` (grouped-query heads are repeated).
        key_mask: optional (B, L) bool, the keys the query may attend to (real tokens at or before
            it); default all.
        scaling: default ``1/sqrt(D)``.

    Returns:
        (B, L) float32.
    """
    q, single = as_batch(query, "query", 3)
    k, _ = as_batch(keys, "keys", 4)
    B, H, D = q.shape
    if k.shape[0] != B or k.shape[-1] != D or H % k.shape[1]:
        raise ValueError(f"keys {tuple(k.shape)} do not fit query {tuple(q.shape)}: need (B, H_kv, L, D) with H a multiple of H_kv")
    k = k.float().repeat_interleave(H // k.shape[1], dim=1)
    logits = torch.einsum("bhd,bhld->bhl", q.float(), k) * (1.0 / math.sqrt(D) if scaling is None else float(scaling))
    if key_mask is not None:
        m, _ = as_batch(key_mask, "key_mask", 2)
        logits = logits.masked_fill(~m.bool()[:, None, :], float("-inf"))
    out = torch.softmax(logits, dim=-1).mean(dim=1)
    return out[0] if single else out

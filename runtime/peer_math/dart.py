"""DART (ZichenWen1/DART, mirror xqy1111111/DART): duplication-aware selection at layer K.

Reference (docs/methods.md, DART; ``llava/model/language_model/modeling_llama_self.py``,
``get_retained_image_token``): entering decoder layer ``K = 2``, from layer ``K − 1``:

* **pivots**: the L1 norm of each token's key (post-RoPE, heads concatenated); the
  ``pivot_image_token = 4`` image tokens and the ``pivot_text_token = 4`` tokens after the image
  with the largest norms;
* for each pivot, in the order CPython iterates ``set(image_pivots + text_pivots)``: the
  ``TOKEN_TOPK = budget // (4 + 4)`` image tokens (not pivots, not taken yet) **least**
  cosine-similar to the pivot, on layer ``K − 1``'s output passed through the final norm;
* keep the image pivots and every token taken (text pivots are not image tokens: they stay
  anyway). ``budget = max_num_trunction`` = 128 by default → ``4 + 8·16 = 132`` image tokens.

No attention weights (works with FlashAttention). Positions kept (``position_ids = keep_indexs``).
Deviations: ties go to the earlier position (``torch.topk`` leaves them unspecified); a pivot
takes at most the tokens left (the reference's ``topk`` fails); the pivot order is CPython's set
order of the positions **in the unpadded prompt**, so left padding never changes the result;
any batch size (the reference reads row 0). LLaVA-NeXT's row-end newlines are never candidates
here (the runtime protects them; the reference counts them as image tokens).

Example:
    >>> import torch
    >>> torch.manual_seed(0) and None
    >>> keys, hidden = torch.randn(1, 40, 8), torch.randn(1, 40, 6)
    >>> image = torch.zeros(1, 40, dtype=torch.bool); image[0, 5:29] = True
    >>> text = torch.zeros(1, 40, dtype=torch.bool); text[0, 29:] = True
    >>> keep = dart_keep(keys, hidden, image, text, budget=8, pivot_image=2, pivot_text=2)
    >>> int(keep.sum()), bool((keep & ~image).any())   # 2 pivots + 4 pivots · (8 // 4) picks
    (10, False)
"""
from __future__ import annotations

import torch

from ._common import as_batch, check_count, order_best_first, work_dtype

__all__ = ["DEFAULT_LAYER", "DEFAULT_BUDGET", "DEFAULT_PIVOTS", "token_topk", "retained_count", "pivot_order", "dart_keep", "select_row"]

DEFAULT_LAYER = 2
DEFAULT_BUDGET = 128
"""``max_num_trunction``: image tokens picked by the pivots (LLaVA-NeXT scripts: 320)."""
DEFAULT_PIVOTS = (4, 4)
"""(image pivots, text pivots)."""


def token_topk(budget: int, pivot_image: int = 4, pivot_text: int = 4) -> int:
    """Image tokens each pivot takes: ``budget // (pivot_image + pivot_text)``.

    Example:
        >>> token_topk(128), token_topk(320)
        (16, 40)
    """
    check_count(budget, 1 << 62, "budget")
    if pivot_image + pivot_text < 1:
        raise ValueError("pivot_image + pivot_text must be at least 1")
    return budget // (pivot_image + pivot_text)


def retained_count(n_image: int, budget: int, pivot_image: int = 4, pivot_text: int = 4, n_text: int | None = None) -> int:
    """Image tokens DART keeps: ``min(n, pivots + Σ per-pivot picks)`` (132 at the defaults).

    Args:
        n_image: candidate image tokens; ``n_text``: tokens after the image (default: enough).
    """
    image_pivots = min(pivot_image, n_image)
    text_pivots = pivot_text if n_text is None else min(pivot_text, n_text)
    left, per = n_image - image_pivots, token_topk(budget, pivot_image, pivot_text)
    return image_pivots + min(left, per * (image_pivots + text_pivots))


def pivot_order(image_pivots: list[int], text_pivots: list[int]) -> list[int]:
    """The order the reference visits pivots: CPython's iteration order of the set of positions.

    The reference builds ``set(image_indices + query_indices)`` from the two top-k lists (largest
    norm first) and iterates a copy of it; for small ints that order follows the hash table's
    slots, not the values. The same operations on the same ints reproduce it exactly.
    """
    pivots = set(list(image_pivots) + list(text_pivots))
    return list(pivots.copy())


def dart_keep(
    keys: torch.Tensor,
    hidden: torch.Tensor,
    image: torch.Tensor,
    text: torch.Tensor,
    budget: int = DEFAULT_BUDGET,
    pivot_image: int = 4,
    pivot_text: int = 4,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, L) bool: the image tokens DART keeps entering layer ``K``.

    Args:
        keys: (B, L, H·D) layer ``K − 1``'s keys after RoPE, heads concatenated (or (B, H, L, D)).
        hidden: (B, L, C) layer ``K − 1``'s output after the model's final norm.
        image: (B, L) bool, the candidate image tokens.
        text: (B, L) bool, the tokens after the image (where text pivots are chosen).
        budget: ``max_num_trunction``.
        pivot_image, pivot_text: pivot counts.
        valid: optional (B, L) bool of real tokens; positions count from each row's first real
            token (the unpadded prompt's positions), which fixes the pivot order.
    """
    if keys.ndim == 4:  # (B, H, L, D) → (B, L, H·D), as the reference concatenates the heads
        keys = keys.permute(0, 2, 1, 3).reshape(keys.shape[0], keys.shape[2], -1)
    k, single = as_batch(keys, "keys", 3)
    h, _ = as_batch(hidden, "hidden", 3)
    im, _ = as_batch(image, "image", 2)
    tx, _ = as_batch(text, "text", 2)
    B, L = im.shape
    if k.shape[:2] != (B, L) or h.shape[:2] != (B, L) or tx.shape != (B, L):
        raise ValueError(f"keys {tuple(k.shape)}, hidden {tuple(h.shape)}, image {tuple(im.shape)} and text {tuple(tx.shape)} "
                         "must agree on (B, L)")
    per = token_topk(budget, pivot_image, pivot_text)
    norms = k.to(work_dtype(k)).abs().sum(dim=-1)  # L1 norm of each token's key
    va = torch.ones_like(im, dtype=torch.bool) if valid is None else as_batch(valid, "valid", 2)[0].bool()
    offset = torch.argmax(va.int(), dim=1)  # first real token of each row
    keep = torch.zeros(B, L, dtype=torch.bool, device=im.device)
    for b in range(B):
        normed = torch.nn.functional.normalize(h[b].to(work_dtype(h)), dim=-1, eps=1e-8)
        keep[b] = select_row(norms[b], normed, im[b], tx[b], per, pivot_image, pivot_text, int(offset[b]))[0]
    return keep[0] if single else keep


def select_row(norms: torch.Tensor, normed: torch.Tensor, image: torch.Tensor, text: torch.Tensor, per: int,
               pivot_image: int = 4, pivot_text: int = 4, base: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One row of :func:`dart_keep` from its precomputed parts (the runtime's scorer reuses them).

    Args:
        norms: (L,) the key L1 norms; ``normed``: (L, C) the final-normed hidden states, unit length.
        image, text: (L,) bool candidates and text-pivot positions; ``per``: :func:`token_topk`.
        base: the row's first real token (pivot order counts positions from it).

    Returns:
        ``(keep, pivots, nearest)``: (L,) bool of the image tokens kept, the pivot positions (image
        pivots first, then text pivots, each largest norm first), and (image tokens,) each image
        token's cosine similarity to its nearest pivot, in position order.
    """
    img_pos, txt_pos = torch.nonzero(image).flatten(), torch.nonzero(text).flatten()
    chosen = torch.zeros(image.shape[0], dtype=torch.bool, device=image.device)
    if img_pos.numel() == 0:
        return chosen, img_pos, torch.zeros(0, dtype=normed.dtype, device=normed.device)
    img_piv = img_pos[order_best_first(norms[img_pos])[: min(pivot_image, img_pos.numel())]]
    txt_piv = txt_pos[order_best_first(norms[txt_pos])[: min(pivot_text, txt_pos.numel())]]
    order = pivot_order((img_piv - base).tolist(), (txt_piv - base).tolist())
    chosen[img_piv] = True
    # Every pivot's cosine similarity to every image token in one product (the reference computes
    # one pivot at a time over the tokens left); the pivots then take their picks in order.
    pivots = torch.tensor(order, dtype=torch.long, device=image.device) + base
    similarity = normed[pivots] @ normed[img_pos].T
    available = ~chosen[img_pos]  # over img_pos: not an image pivot, not taken yet
    left = int(available.sum())
    for row in range(len(order)):
        if left == 0:
            break
        n = min(per, left)
        take = order_best_first(-similarity[row], available)[:n]
        available[take] = False
        left -= n
    chosen[img_pos[~available]] = True
    return chosen, torch.cat([img_piv, txt_piv]), similarity.amax(dim=0)

"""SparseVLM (Gumpest/SparseVLMs), **v2 form** (``USE_VERSION=2_0``): text raters, then at three
layers the raters' RoPE-corrected attention of the top heads picks the image tokens to keep.

Reference (docs/methods.md, SparseVLM; ``llava/model/language_model/modelling_sparse_llama.py``
``LlamaDynamicvitModel.forward``, ``score.py``):

* **raters** (once, on the layer-0 input): ``m = softmax_text(V·Tᵀ)`` over the text tokens
  after the image, averaged over the image tokens; raters = text tokens with ``m > mean(m)``;
* at layers ``2, 6, 15`` the layer runs with full attention; v2 divides its post-softmax
  attention by the RoPE pattern of all-ones queries and keys (``(2/√d)·Σ cos((pᵢ − pⱼ)θ)``),
  keeps the 14 heads whose rater→image attention sums are largest, averages them, then the rater
  rows; the image columns' top ``min(schedule[stage], n − 1)`` survive the layer (dropped from
  its output, i.e. on entry to the next layer); positions are kept; no merge.
* schedules (``score.py``): v2 192 → 300/200/118, 128 → 238/108/60, 96 → 246/54/28,
  64 → 66/34/20; v1 192 → 300/200/110, 128 → 303/110/36, 96 → 238/48/26, 64 → 66/30/17.

v1's recycling (the top 30 % of the dropped tokens clustered into ⌊n/10⌋+1 merged tokens, with
``torch.rand`` noise in the density, and positions truncated) is **out of scope**: it is not
deterministic and v2 disables it. ``rope_correction=False, top_heads=None`` gives v1's selection
without recycling. Deviations: ties go to the earlier position; per-row raters (the reference
mixes batch rows in ``torch.where``); no raters above the mean (all equal) → every text token
rates (the reference's mean of an empty set is NaN); fewer than 14 heads → all heads; float32.

Example:
    >>> import torch
    >>> torch.manual_seed(0) and None
    >>> v, t = torch.randn(2, 12, 8), torch.randn(2, 5, 8)
    >>> r = raters(v, t)
    >>> attn = torch.softmax(torch.randn(2, 4, 5, 30), -1)[..., 3:15]   # rater rows × image keys
    >>> s = scores(attn, r)
    >>> keep = select(s, keep_count(SCHEDULES["2.0"][64][2], 12))
    >>> keep.sum(dim=1).tolist()
    [11, 11]
"""
from __future__ import annotations

import math

import torch

from ._common import as_batch, check_count, top_k_mask, work_dtype

__all__ = ["LAYERS", "SCHEDULES", "TOP_HEADS", "keep_count", "raters", "rope_bias", "scores", "select"]

LAYERS = (2, 6, 15)
"""Layers whose own attention scores the cut; the tokens leave on exit (enter ``l + 1`` pruned)."""
SCHEDULES = {
    "2.0": {192: (300, 200, 118), 128: (238, 108, 60), 96: (246, 54, 28), 64: (66, 34, 20)},
    "1.0": {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)},
}
"""Version → LLaVA-1.5 equivalent token budget → image tokens kept at each of :data:`LAYERS`."""
TOP_HEADS = 14


def keep_count(scheduled: int, n_current: int) -> int:
    """``min(scheduled, n − 1)``: the reference never keeps every token at a sparse layer."""
    check_count(n_current, 1 << 62, "n_current")
    return max(0, min(int(scheduled), n_current - 1))


def raters(visual: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) bool: the text tokens whose relevance to the image is above the mean.

    Args:
        visual: (B, V, D) layer-0 input (embeddings) of the image tokens.
        text: (B, T, D) layer-0 input of the tokens after the image.
        text_mask: optional (B, T) bool of real text tokens (padding excluded).
    """
    v, single = as_batch(visual, "visual", 3)
    t, _ = as_batch(text, "text", 3)
    mask = torch.ones(t.shape[:2], dtype=torch.bool, device=t.device) if text_mask is None else as_batch(text_mask, "text_mask", 2)[0].bool()
    w = work_dtype(v)
    logits = (v.to(w) @ t.to(w).transpose(1, 2)).masked_fill(~mask[:, None, :], float("-inf"))
    relevance = torch.softmax(logits, dim=2).mean(dim=1)  # (B, T)
    mean = (relevance * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1)
    out = (relevance > mean) & mask
    out = torch.where(out.any(dim=1, keepdim=True), out, mask)  # no rater above the mean: everyone rates
    return out[0] if single else out


def rope_bias(q_positions: torch.Tensor, k_positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """(B, Q, K) the attention logit RoPE alone gives all-ones queries and keys.

    ``(2/√d)·Σ_m cos((p_q − p_k)·θ_m)`` with ``d = 2·len(inv_freq)`` (the rotate-half layout):
    SparseVLM v2 divides the attention by it ("text-visual attention gravity correction").
    """
    qp, single = as_batch(q_positions, "q_positions", 2)
    kp, _ = as_batch(k_positions, "k_positions", 2)
    theta = inv_freq.double().reshape(-1)
    delta = (qp.double()[:, :, None] - kp.double()[:, None, :])[..., None] * theta  # (B, Q, K, d/2)
    out = (2.0 / math.sqrt(2 * theta.numel())) * torch.cos(delta).sum(dim=-1)
    out = out.float()
    return out[0] if single else out


def scores(
    attention: torch.Tensor,
    rater_mask: torch.Tensor,
    bias: torch.Tensor | None = None,
    top_heads: int | None = TOP_HEADS,
) -> torch.Tensor:
    """(B, V) SparseVLM's relevance of each image token at a sparse layer.

    Args:
        attention: (B, H, T, V) post-softmax attention (over the whole sequence) of the text rows
            to the image columns, per head.
        rater_mask: (B, T) bool, :func:`raters`.
        bias: optional (B, T, V) :func:`rope_bias` of those rows and columns (v2's correction);
            None skips it (v1).
        top_heads: heads kept by their summed rater→image attention (14); None keeps all (v1).
    """
    a, single = as_batch(attention, "attention", 4)
    r, _ = as_batch(rater_mask, "rater_mask", 2)
    a = a.to(work_dtype(a))
    if bias is not None:
        a = a / as_batch(bias, "bias", 3)[0].to(a.dtype)[:, None]
    rm = r.bool()[:, None, :, None].to(a.dtype)
    if top_heads is not None and top_heads < a.shape[1]:
        per_head = (a * rm).sum(dim=(2, 3))  # (B, H)
        order = torch.sort(per_head, dim=1, descending=True, stable=True).indices[:, :top_heads]
        a = a.gather(1, order[:, :, None, None].expand(-1, -1, *a.shape[2:]))
    head_mean = a.mean(dim=1)  # (B, T, V)
    out = (head_mean * r.bool()[..., None]).sum(dim=1) / r.sum(dim=1, keepdim=True).clamp(min=1)
    return out[0] if single else out


def select(scores: torch.Tensor, n_keep: int | torch.Tensor, eligible: torch.Tensor | None = None) -> torch.Tensor:
    """(B, V) bool: the ``n_keep`` best image tokens (ties: the earlier position)."""
    s, single = as_batch(scores, "scores", 2)
    out = top_k_mask(s, n_keep, None if eligible is None else as_batch(eligible, "eligible", 2)[0].bool())
    return out[0] if single else out

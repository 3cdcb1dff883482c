"""Partial attention statistics without eager attention.

Two attention implementations are registered with transformers, ``recipe_runtime_sdpa`` and
``recipe_runtime_eager``. Each calls an optional per-module *probe* with the post-RoPE queries and
the cache-updated keys, then delegates to the stock kernel with the very same arguments, so a model
whose probes are idle computes bit-identical outputs. A probe reduces only the query rows it needs
(chunk by chunk) into per-key sums: nothing L×L is kept. On an SDPA prefill a recipe's probe
instead computes the layer's attention from the very softmax rows it sums
(:func:`attention_with_row_sums`): the probe then costs its weighted sums, not a second ``QKᵀ``.
"""
from __future__ import annotations

import sys
import weakref
from typing import Callable

import numpy as np
import torch

from .methods.heads import HEAD_REDUCTIONS

WRAPPED = {"sdpa": "recipe_runtime_sdpa", "eager": "recipe_runtime_eager"}
UNWRAPPED = {v: k for k, v in WRAPPED.items()}

Probe = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, "torch.Tensor | None", float, "torch.Tensor | None"],
                 "torch.Tensor | None"]
"""``probe(module, query, key, mask, scaling, value)``; ``value`` is given only when the call is
:func:`fusable`, and then the probe may return the layer's attention output (B, L, H, hd) itself
(:func:`attention_with_row_sums`) instead of None, which runs the stock kernel."""
_PROBES: "weakref.WeakKeyDictionary[torch.nn.Module, Probe]" = weakref.WeakKeyDictionary()
_registered = False

PROBE_CHUNK = 64
"""Query rows per chunk of a recipe's scoring probe, on every device.

Each chunk multiplies its rows by the keys up to its last row (a staircase over the causal
triangle), so the chunk size decides the probe's FLOPs. One size everywhere makes the FLOPs a
recipe is compiled and verified with the FLOPs every device runs (:func:`row_sum_macs`); 64 keeps
the staircase within 32 keys per row of the exact triangle and is the fastest on CPU (the score
block stays in cache). On a GPU it means more, smaller launches (a 3000-row LLaVA-NeXT probe is 47
chunks; not yet timed on one): if that shows in ``bench/gpu.sh``, raise this one constant, and the
counted FLOPs follow (:func:`row_sum_macs` reads it). The calibration pass is not budgeted and
keeps the device default.
"""


def _eager_for(module: torch.nn.Module) -> Callable:
    # Each modelling file defines its own eager_attention_forward; use the module's family's one.
    return getattr(sys.modules[type(module).__module__], "eager_attention_forward")


def _make(base: str) -> Callable:
    def attention(module, query, key, value, attention_mask, **kwargs):
        probe = _PROBES.get(module)
        if probe is not None:
            fusing = base == "sdpa" and fusable(module, query, key, value, attention_mask, kwargs)
            output = probe(module, query, key, attention_mask, kwargs.get("scaling") or module.scaling,
                           value if fusing else None)
            if output is not None:
                return output, None
        if base == "sdpa":
            from transformers.integrations.sdpa_attention import sdpa_attention_forward as stock
        else:
            stock = _eager_for(module)
        return stock(module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"recipe_runtime_{base}_attention"
    return attention


def register() -> None:
    """Register the wrapped implementations (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    masks = {"sdpa": sdpa_mask, "eager": eager_mask}
    for base, name in WRAPPED.items():
        AttentionInterface.register(name, _make(base))
        # Without a mask registration create_causal_mask returns None and padding is silently lost.
        AttentionMaskInterface.register(name, masks[base])
    _registered = True


def set_probe(module: torch.nn.Module, probe: Probe | None) -> None:
    """Attach (or with ``None`` detach) a probe to one attention module."""
    if probe is None:
        _PROBES.pop(module, None)
    else:
        _PROBES[module] = probe


def attention_row_sums(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    row_weights: torch.Tensor,
    head_reduce: str = "max",
    chunk: int | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Weighted sums of head-reduced attention rows, computed only for the rows that are needed.

    Args:
        query: (B, H, Lq, hd) post-RoPE queries.
        key: (B, KV, Lk, hd) post-RoPE, cache-updated keys; with GQA, query head h reads key
            head h // (H / KV), as transformers' repeat_kv lays them out.
        attention_mask: None (plain causal, queries are the last Lq positions), a boolean 4D mask
            (True = attend) or an additive float 4D mask, as transformers passes them. It must be
            causal (true of every supported family's language model): keys after a row's own
            position are never read.
        scaling: the softmax scale.
        row_weights: (B, G, Lq) weights of each query row in each of G groups; rows with zero
            weight in every group and sample are never computed.
        head_reduce: a :data:`runtime.methods.heads.HEAD_REDUCTIONS` name ("max": FitPrune,
            "mean"), how the heads' post-softmax probabilities are combined.
        chunk: query rows per chunk (memory is B·H·chunk·Lk floats); default 64 on CPU, where
            the score block then stays in cache (measured fastest), 1024 elsewhere. Rows are taken
            as one contiguous span per chunk; chunks without a weighted row are skipped. A recipe's
            probe passes :data:`PROBE_CHUNK`, so that its FLOPs (:func:`row_sum_macs`) do not
            depend on the device.
        dtype: the dtype of the ``q·kᵀ`` products (default float32, whatever the model's); the
            masking, softmax and sums always run in float32. A bf16 model's calibration may pass
            its own dtype (``collect_statistics(probe_dtype="model")``; README states the error).

    Returns:
        (B, G, Lk) float32: ``sum_q row_weights[b, g, q] * reduce_h softmax(q·kᵀ)[b, h, q, k]``.

    Example:
        >>> q, k = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
        >>> w = torch.zeros(1, 1, 5); w[0, 0, -1] = 1.0
        >>> attention_row_sums(q, k, None, 0.5, w).shape
        torch.Size([1, 1, 5])
    """
    batch, heads, q_len, _ = query.shape
    k_len = key.shape[2]
    weights = row_weights.float()
    out = torch.zeros(batch, weights.shape[1], k_len, dtype=torch.float32, device=query.device)
    needed = torch.nonzero(weights.abs().sum(dim=(0, 1)) > 0).flatten()
    if needed.numel() == 0:
        return out
    reduce = HEAD_REDUCTIONS[head_reduce]
    first, last = int(needed[0]), int(needed[-1])
    chunk = chunk or (64 if query.device.type == "cpu" else 1024)
    scores = _ChunkScores(query, key, attention_mask, scaling, dtype, min(chunk, last + 1 - first), rows=(first, last + 1))
    for start in range(first, last + 1, chunk):
        end = min(start + chunk, last + 1)
        row_weight = weights[:, :, start:end]
        if not bool(row_weight.any()):
            continue
        probs = scores.probabilities(start, end)
        out[:, :, : probs.shape[-1]] += torch.bmm(row_weight, reduce(probs, dim=scores.head_dims))
    return out


class _ChunkScores:
    """Softmaxed attention rows of one layer, a span of query rows at a time (float32).

    GQA without repeating keys: the ``G`` query heads sharing a key head become extra rows of one
    product. The queries are laid out once as (B, KV, rows, G, hd), so that a span of rows is a view
    of one contiguous block, and the rows come back as (B, KV, rows, G, keys): query head
    ``kv·G + g``, as transformers' repeat_kv numbers them.
    A finite floor instead of -inf: a fully masked row (left padding of another sample) softmaxes to
    uniform instead of NaN; its row weight is zero and its output is never read by a real row.
    """

    def __init__(self, query, key, attention_mask, scaling, dtype, square, rows=None):
        self.mask, self.scaling = attention_mask, scaling
        self.batch, self.heads, q_len, head_dim = query.shape
        self.kv_heads = key.shape[1]
        self.group = self.heads // self.kv_heads
        self.head_dims = (1, 3) if self.group > 1 else 1  # the head dimensions of what :meth:`probabilities` returns
        self.offset = key.shape[2] - q_len  # the queries are the last q_len positions
        self.compute = dtype or torch.float32
        # The rows that will be asked for, laid out (and in float32 scaled) in one pass: scaling rows·hd
        # values instead of the rows·keys scores.
        self.first, last = rows or (0, q_len)
        span = query[:, :, self.first:last].unflatten(1, (self.kv_heads, self.group)).transpose(2, 3)
        self.query = torch.empty(span.shape, dtype=self.compute, device=query.device)
        if self.compute == torch.float32:
            torch.mul(span, scaling, out=self.query)
        else:
            self.query.copy_(span)
        self.key_t = key.to(self.compute).transpose(-1, -2)
        self.lowest = torch.finfo(torch.float32).min
        # Causal: a span's rows see every key up to its own last row, and only the square of its last
        # ``rows`` keys holds keys after some row (above the diagonal). Adding the floor there is one
        # vectorised pass (faster than a boolean fill); a score plus the floor is the floor in float32.
        self.future = (torch.full((square, square), self.lowest, device=query.device).triu_(1)[:, None]
                       if attention_mask is None else None)

    def probabilities(self, start: int, end: int) -> torch.Tensor:
        """(B, KV, end − start, G, keys) softmax rows ``start:end`` over the keys up to row ``end − 1``
        ((B, H, end − start, keys) without GQA); :attr:`head_dims` are its head dimensions."""
        rows = end - start
        keys = end + self.offset  # causal: no row of the span sees a later key
        q = self.query[:, :, start - self.first:end - self.first].flatten(2, 3)  # a view: the span is contiguous
        scores = torch.matmul(q, self.key_t[..., :keys]).view(self.batch, self.kv_heads, rows, self.group, keys)
        if self.compute != torch.float32:  # a half-precision product keeps its scale out of the rounding
            scores = scores.float().mul_(self.scaling)
        mask = self.mask
        if mask is None:
            scores[..., keys - rows:] += self.future[:rows, :, :rows]
        else:
            span = mask[:, :, start:end, :keys]
            # (B, 1 or H, rows, keys) -> broadcastable against (B, KV, rows, G, keys)
            span = span[:, :, :, None] if span.shape[1] == 1 else span.unflatten(1, (self.kv_heads, self.group)).transpose(2, 3)
            if mask.dtype == torch.bool:
                scores.masked_fill_(~span, self.lowest)
            else:
                scores += span.float().clamp(min=self.lowest)
        probs = scores.softmax(dim=-1)
        return probs if self.group > 1 else probs.squeeze(3)


def fusable(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            attention_mask: "torch.Tensor | None", kwargs: dict) -> bool:
    """Whether :func:`attention_with_row_sums` computes what transformers' SDPA call would.

    True for a causal, full-length prefill (no cache prefix) with a 4D boolean or additive mask
    or none, and no feature the plain softmax attention lacks (soft-capping, sinks, position bias,
    dropout in training, a paged cache); anything else keeps the stock kernel and the separate probe.
    """
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        return False
    if kwargs.get("position_bias") is not None or kwargs.get("cache") is not None or kwargs.get("output_attentions"):
        return False
    if (module.training and kwargs.get("dropout")) or kwargs.get("is_causal") is False or not getattr(module, "is_causal", True):
        return False
    q_len = query.shape[2]
    if q_len < 2 or key.shape[2] != q_len or value.shape[2] != q_len or key.shape[-1] != value.shape[-1]:
        return False
    if query.shape[1] % key.shape[1]:
        return False
    if attention_mask is None:
        return True
    return (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4
            and attention_mask.shape[-2] == q_len and attention_mask.shape[-1] >= q_len)


def attention_with_row_sums(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    row_weights: torch.Tensor,
    head_reduce: str = "max",
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's attention output and :func:`attention_row_sums`' sums from one pass over the scores.

    A pruning layer's probe recomputes the softmax rows the layer's own attention has just made;
    here the layer's attention is those rows times the values, so the probe adds only its weighted
    sums (and what the unfused softmax costs over SDPA's). The output equals SDPA's to float
    rounding (softmax in float32, then ``P·V``), the sums :func:`attention_row_sums`' (the same
    rows; spans of ``chunk`` rows from row 0, so the summing order may differ). Only for calls
    :func:`fusable` accepts.

    Args:
        query, key, attention_mask, scaling, row_weights, head_reduce, chunk: as
            :func:`attention_row_sums`; keys are the whole prefill (``Lk == Lq``).
        value: (B, KV, L, hd) values, laid out like ``key``.

    Returns:
        ``(output, sums)``: (B, L, H, hd) attention output in ``query``'s dtype, laid out as
        transformers' attention functions return it, and the (B, G, L) float32 sums.

    Example:
        >>> q, k, v = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
        >>> w = torch.zeros(1, 1, 5); w[0, 0, -1] = 1.0
        >>> out, sums = attention_with_row_sums(q, k, v, None, 0.5, w)
        >>> torch.allclose(out.transpose(1, 2), torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.5), atol=1e-6)
        True
    """
    batch, heads, length, head_dim = query.shape
    kv_heads = key.shape[1]
    weights = row_weights.float()
    sums = torch.zeros(batch, weights.shape[1], length, dtype=torch.float32, device=query.device)
    output = torch.empty(batch, length, heads, head_dim, dtype=query.dtype, device=query.device)
    needed = torch.nonzero(weights.abs().sum(dim=(0, 1)) > 0).flatten()
    first, last = (int(needed[0]), int(needed[-1])) if needed.numel() else (length, -1)
    reduce = HEAD_REDUCTIONS[head_reduce]
    chunk = chunk or (64 if query.device.type == "cpu" else 1024)
    scores = _ChunkScores(query, key, attention_mask, scaling, None, min(chunk, length))
    values = value.float()
    grouped = output.view(batch, length, kv_heads, heads // kv_heads, head_dim)  # query head kv·G + g
    for start in range(0, length, chunk):
        end = min(start + chunk, length)
        probs = scores.probabilities(start, end)
        keys = probs.shape[-1]
        mixed = torch.matmul(probs.view(batch, kv_heads, -1, keys), values[:, :, :keys])  # (B, KV, rows·G, hd)
        grouped[:, start:end] = mixed.view(batch, kv_heads, end - start, -1, head_dim).transpose(1, 2)
        if end > first and start <= last:
            sums[:, :, :keys] += torch.bmm(weights[:, :, start:end], reduce(probs, dim=scores.head_dims))
    return output, sums


def row_sum_macs(heads: int, head_dim: int, groups: int, first, n_tokens, chunk: int = PROBE_CHUNK):
    """Multiply-adds :func:`attention_row_sums` spends on one prefill row (batch 1), exactly.

    The needed query rows are the span ``[first, n_tokens)`` of an ``n_tokens``-long prefill
    (``q_len == k_len``). Chunk ``c`` of ``rows_c`` rows ending at row ``end_c`` computes
    ``QKᵀ`` on ``heads·rows_c·head_dim·end_c`` multiply-adds and the weighted row sum on
    ``groups·rows_c·end_c``; the softmax, masking and head reduction are elementwise, linear in
    the score block, and not counted (as the FLOPs model leaves out the model's own softmax).
    With ``m`` full chunks of ``C`` rows and ``r`` rows left over, ``Σ_c rows_c·end_c =
    C·m·first + C²·m(m+1)/2 + r·(first + m·C + r)``. In a padded batch every row computes the
    widest span: that padding is the batch's cost, not the request's.

    Args:
        heads, head_dim: query heads and their width (keys are not repeated for GQA: the
            product count is the same).
        groups: row groups summed (the weights' ``G``).
        first: the first needed row (scalar or numpy array).
        n_tokens: the sequence length (scalar or array, broadcast with ``first``).
        chunk: rows per chunk (:data:`PROBE_CHUNK`).

    Returns:
        float64 multiply-adds (array if an argument is one), 0 where the span is empty.

    Example:
        >>> row_sum_macs(2, 4, 1, first=9, n_tokens=10)  # the last row: 1 row × 10 keys × (2·4 + 1)
        90.0
    """
    first = np.asarray(first, dtype=np.float64)
    n = np.asarray(n_tokens, dtype=np.float64)
    rows = np.maximum(n - first, 0.0)
    full, rest = np.floor_divide(rows, chunk), np.mod(rows, chunk)
    stairs = chunk * full * first + chunk * chunk * full * (full + 1) / 2 + rest * (first + full * chunk + rest)
    out = (heads * head_dim + groups) * stairs
    return float(out) if out.ndim == 0 else out

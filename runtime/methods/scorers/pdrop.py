"""PyramidDrop's scorer: the pruning layer's *own* attention of the last instruction token.

At a pruning layer ``l`` (one of PyramidDrop's stages), before the layer runs: its
``input_layernorm``, ``q_proj`` (the last prompt token only) and ``k_proj`` (every token) on the
hidden states entering it, RoPE from the rotary table the layer receives (original positions),
then the head-mean softmax row (:func:`runtime.peer_math.pdrop.last_token_scores`). This is a
probe at the layer's input, not the previous layer's attention; its projections are extra work,
declared by :meth:`probe_macs` so the FLOPs model counts them.
"""
from __future__ import annotations

import numpy as np
import torch

from ...peer_math import pdrop as reference
from .base import Scorer, register_scorer


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of (B, H, L, hd) ``x`` with (B|1, L, hd) tables, as every supported family applies it."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    return x * cos + rotate_half(x) * sin


def projections(module: torch.nn.Module, hidden: torch.Tensor, rows: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor):
    """Post-RoPE (query rows, keys) of a decoder layer on the hidden states entering it.

    Args:
        module: the decoder layer (``input_layernorm``, ``self_attn.q_proj`` / ``k_proj``, optional
            ``q_norm`` / ``k_norm``).
        hidden: (B, L, D) the layer's input.
        rows: positions of the query rows (default: the last one).

    Returns:
        ``(query (B, H, R, hd), keys (B, KV, L, hd))``.
    """
    attn = module.self_attn
    x = module.input_layernorm(hidden)
    B, L, _ = x.shape
    hd = attn.head_dim
    rows = torch.tensor([L - 1], device=x.device) if rows is None else rows.to(x.device)
    q = attn.q_proj(x[:, rows]).view(B, rows.numel(), -1, hd)
    k = attn.k_proj(x).view(B, L, -1, hd)
    if getattr(attn, "q_norm", None) is not None:  # Qwen3-style per-head norms before RoPE
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    cos, sin = cos.to(x.device), sin.to(x.device)
    return apply_rope(q, cos[:, rows], sin[:, rows]), apply_rope(k, cos, sin)


def layer_parts_missing(model) -> str | None:
    """Why a decoder layer's q/k cannot be recomputed from its input, or None."""
    from ...families import family_for

    layers = family_for(model).layers(model)
    for name in ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.head_dim", "self_attn.scaling"):
        obj = layers[0]
        for part in name.split("."):
            obj = getattr(obj, part, None)
        if obj is None:
            return f"its decoder layers have no {name}, which recomputing a layer's own query and keys needs"
    return None


@register_scorer("pdrop")
class PyramidDrop(Scorer):
    method = "pdrop"
    head_reduce = "mean"  # modeling_llama_pdrop.py: torch.mean(attn_weights, dim=0) over heads
    attention_probe = False
    input_offsets = (0,)

    def unsupported_reason(self, model) -> str | None:
        return layer_parts_missing(model)

    def on_layer_input(self, state, layer, module, hidden, kwargs, roles, context) -> None:
        cos, sin = kwargs["position_embeddings"]
        with torch.no_grad():
            query, keys = projections(module, hidden, None, cos, sin)
            state["scores"] = reference.last_token_scores(query[:, :, 0], keys, key_mask=roles.valid.to(keys.device),
                                                          scaling=module.self_attn.scaling)

    def probe_macs(self, shape, n_tokens, n_visual, n_before, n_text):
        qd, kvd = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
        # q_proj of one token, k_proj of every token, one row of scores (the softmax is not counted)
        return shape.hidden * qd + np.asarray(n_tokens, dtype=np.float64) * (shape.hidden * kvd + qd)

    def groups(self, text, visual):  # never called: no attention probe
        raise NotImplementedError

    def from_statistics(self, cross, self_attn, last, n_text):
        # The calibration statistics hold layer l − 1's last-token row, the nearest recorded
        # proxy of layer l's own; only the reported divergence uses it, not the search.
        return last.astype(np.float64)

"""SparseVLM's scorer, v2 form: text raters, then a probed layer's RoPE-corrected rater attention.

Once per prefill, on the language model's input: the raters, the text tokens after the image whose
relevance to the image is above the mean (:func:`runtime.peer_math.sparsevlm.raters`). At each
scoring layer (the probed layer ``l − 1`` of a cut on entry to ``l``: SparseVLM drops from layer
``l − 1``'s output): the raters' per-head post-softmax attention to the image tokens, divided by
the attention RoPE alone gives all-ones queries and keys (computed from the rotary table the
layer receives, so M-RoPE families get their own pattern), the 14 heads with the largest rater →
image mass, averaged over heads and raters (:func:`runtime.peer_math.sparsevlm.scores`).
v1's recycling (merging dropped tokens) is out of scope: it is random and v2 disables it.
"""
from __future__ import annotations

import numpy as np
import torch

from ...peer_math import sparsevlm as reference
from .base import Scorer, register_scorer
from .pdrop import rotate_half


def rope_pattern(cos: torch.Tensor, sin: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor, scaling: float) -> torch.Tensor:
    """(R, C) the attention logit RoPE alone gives all-ones queries and keys at those positions.

    ``cos``/``sin``: (L, hd) of one row. For 1-D RoPE this is ``(2/√d)·Σ cos((p_q − p_k)θ)``
    (:func:`runtime.peer_math.sparsevlm.rope_bias`).
    """
    ones = torch.ones(cos.shape[-1], dtype=torch.float32, device=cos.device)
    rotated = ones * cos.float() + rotate_half(ones) * sin.float()  # (L, hd)
    return (rotated[rows] @ rotated[columns].T) * scaling


@register_scorer("sparsevlm")
class SparseVLM(Scorer):
    method = "sparsevlm"
    head_reduce = "mean"  # over the selected heads
    attention_probe = True
    input_offsets = (-1,)  # the probed layer's rotary table

    def on_inputs(self, state, embeds, roles) -> None:
        raters = torch.zeros_like(roles.visual)
        for b in range(embeds.shape[0]):
            image, text = roles.visual[b], roles.text[b]
            if bool(image.any()) and bool(text.any()):
                raters[b, text] = reference.raters(embeds[b, image].float(), embeds[b, text].float()).to(raters.device)
        state["raters"] = raters  # in prompt positions; later layers map them through orig_index

    def on_layer_input(self, state, layer, module, hidden, kwargs, roles, context) -> None:
        state["rope"] = kwargs["position_embeddings"]

    def on_attention(self, state, layer, query, key, mask, scaling, roles) -> bool:
        cos, sin = state["rope"]
        raters = state["raters"].gather(1, roles.orig_index) & roles.valid
        scores = torch.full(roles.visual.shape, float("-inf"), device=roles.visual.device)
        heads, kv_heads = query.shape[1], key.shape[1]
        for b in range(query.shape[0]):
            rows = torch.nonzero(raters[b]).flatten()
            columns = torch.nonzero(roles.visual[b]).flatten()
            if rows.numel() == 0 or columns.numel() == 0:
                continue
            q = query[b][:, rows.to(query.device)].float()  # (H, R, hd)
            k = key[b].float().repeat_interleave(heads // kv_heads, dim=0)  # (H, L, hd)
            logits = (q @ k.transpose(1, 2)) * scaling
            visible = roles.valid[b][None, :].to(query.device) & (torch.arange(k.shape[1], device=query.device)[None, :] <= rows.to(query.device)[:, None])
            attn = torch.softmax(logits.masked_fill(~visible[None], float("-inf")), dim=-1)[:, :, columns.to(query.device)]
            b_rope = 0 if cos.shape[0] == 1 else b
            bias = rope_pattern(cos[b_rope].to(query.device), sin[b_rope].to(query.device), rows.to(query.device), columns.to(query.device), scaling)
            ones = torch.ones(1, rows.numel(), dtype=torch.bool, device=query.device)
            scores[b, columns] = reference.scores(attn[None], ones, bias[None], top_heads=reference.TOP_HEADS)[0].to(scores.device)
        state["scores"] = scores
        return True

    def probe_macs(self, shape, n_tokens, n_visual, n_before, n_text):
        """Per scoring layer: each rater's query against every key and every head, and RoPE's own pattern.

        The raters are the above-mean text tokens, known only at run time; the count takes every
        text token as a rater, an upper bound (the budget holds whatever the prompt).
        """
        n, v, t = (np.asarray(a, dtype=np.float64) for a in (n_tokens, n_visual, n_text))
        return shape.num_heads * shape.head_dim * t * n + shape.head_dim * t * v

    def groups(self, text, visual):  # never called: on_attention handles the probe
        raise NotImplementedError

    def from_statistics(self, cross, self_attn, last, n_text):
        # The text rows' mean attention: the statistics' nearest proxy of the raters' (reported only).
        return cross.astype(np.float64)

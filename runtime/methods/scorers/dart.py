"""DART's scorer: duplication-aware selection at layer ``K``, no attention weights.

Entering the pruning layer ``K``: pivots are the image and text tokens whose layer ``K − 1`` keys
(post-RoPE, heads concatenated) have the largest L1 norms; each pivot adds the image tokens least
cosine-similar to it, on layer ``K − 1``'s output through the model's final norm
(:func:`runtime.peer_math.dart.dart_keep`, 4 + 4 pivots). The keys come from the attention probe
of layer ``K − 1`` (its query is never used), the hidden states from the layer's input.

The recipe's count ``k`` sets the per-pivot picks, ``(k − image pivots) // pivots`` (the
reference's ``max_num_trunction // 8``); any shortfall is filled by the image tokens least similar
to their nearest pivot, so the row keeps exactly ``k``.
"""
from __future__ import annotations

import numpy as np
import torch

from ...peer_math import dart as reference
from ...peer_math._common import order_best_first
from .base import Scorer, register_scorer

CHOSEN = 2.0  # above any −cosine similarity, so DART's own set is kept first


@register_scorer("dart")
class Dart(Scorer):
    method = "dart"
    head_reduce = "mean"  # unused: DART reads no attention weights
    attention_probe = True  # for layer K − 1's keys only
    input_offsets = (0,)

    def unsupported_reason(self, model) -> str | None:
        from ...families import family_for

        if getattr(family_for(model).language_model(model), "norm", None) is None:
            return "its language model has no final norm (language_model.norm), on whose output DART compares tokens"
        return None

    def on_attention(self, state, layer, query, key, mask, scaling, roles) -> bool:
        state["keys"] = key.detach()
        return True

    def on_layer_input(self, state, layer, module, hidden, kwargs, roles, context) -> None:
        with torch.no_grad():
            state["hidden"] = context["final_norm"](hidden)

    def rank(self, state, layer, roles) -> torch.Tensor:
        keys, hidden, n_keep = state["keys"], state["hidden"], state["n_keep"]
        device = roles.visual.device
        keys, hidden = keys.to(device), hidden.to(device)
        pivot_image, pivot_text = reference.DEFAULT_PIVOTS
        scores = torch.full(roles.visual.shape, float("-inf"), device=device)
        keys = keys.permute(0, 2, 1, 3).reshape(keys.shape[0], keys.shape[2], -1)  # (B, L, H·D), as dart_keep reads them
        norms = keys.float().abs().sum(dim=-1)  # (B, L): L1 norm of the concatenated heads
        offset = torch.argmax(roles.valid.int(), dim=1)  # first real token of each row
        for b in range(roles.visual.shape[0]):
            image, text = roles.visual[b], roles.text[b]
            n_image, k = int(image.sum()), int(n_keep[b])
            if n_image == 0 or k <= 0:
                continue
            images = min(pivot_image, n_image, k)
            pivots = images + min(pivot_text, int(text.sum()))
            per = (k - images) // pivots
            unit = torch.nn.functional.normalize(hidden[b].float(), dim=-1, eps=1e-8)
            chosen, _, nearest = reference.select_row(norms[b], unit, image, text, per, images, pivot_text, int(offset[b]))
            img_pos = torch.nonzero(image).flatten()
            scores[b, img_pos] = torch.where(chosen[img_pos], torch.full_like(nearest, CHOSEN), -nearest)
        return scores

    def probe_macs(self, shape, n_tokens, n_visual, n_before, n_text):
        pivots = sum(reference.DEFAULT_PIVOTS)
        # key L1 norms of every token, cosine similarities of each pivot with the image tokens; the
        # probed layer's keys are the model's own (its query rows are never used)
        return np.asarray(n_tokens, dtype=np.float64) * shape.num_kv_heads * shape.head_dim + \
            pivots * np.asarray(n_visual, dtype=np.float64) * shape.hidden

    def groups(self, text, visual):  # never called: on_attention handles the probe
        raise NotImplementedError

    def from_statistics(self, cross, self_attn, last, n_text):
        # DART reads no attention; the statistics offer no proxy of key norms and similarities,
        # so the reported divergence ranks by the last-token row. The search does not use it.
        return last.astype(np.float64)

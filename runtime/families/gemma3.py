"""Gemma 3 (``Gemma3ForConditionalGeneration``, ``model_type == "gemma3"``): sliding and global attention layers.

``model.model`` holds ``vision_tower`` (SigLIP, no CLS), ``multi_modal_projector`` (average-pooled to
``mm_tokens_per_image`` tokens, 256 on the released checkpoints) and ``language_model``. Each image is
one run of ``<image_soft_token>`` placeholders between ``<start_of_image>`` and ``<end_of_image>``.
The decoder interleaves ``sliding_attention`` layers (local RoPE, a window of ``sliding_window`` keys)
with ``full_attention`` layers (global RoPE); the base model passes the language model a *dict* of
masks, one per kind, and at prefill lets the tokens of one image attend to each other both ways
(``token_type_ids`` → block ids, or-ed into the causal mask). After pruning, :meth:`layer_mask`
rebuilds both masks over the pruned sequence with the blocks of the *kept* image tokens, as the
model builds them for a prompt holding only the kept tokens; decode steps need no blocks (the model
passes none either). No pre-LLM stages yet (``pre_llm`` is False: each is refused by name).
"""
from __future__ import annotations

from typing import Any

import torch

from .base import Family, register_family


@register_family("gemma3")
class Gemma3Family(Family):
    """Gemma 3: one image run of ``mm_tokens_per_image`` tokens, sliding/global layers, bidirectional image blocks."""

    layer_kinds = ("full_attention", "sliding_attention")
    text_fields = Family.text_fields + ("sliding_window", "layer_types", "query_pre_attn_scalar", "rope_parameters")
    vision_fields = Family.vision_fields
    top_fields = Family.top_fields + ("mm_tokens_per_image", "boi_token_index", "eoi_token_index")
    vllm_refusal = "Gemma 3 is not served by the vLLM plugin yet; serve it with the HF runtime (runtime.load(recipe).apply(model))"

    def reference_visual_tokens(self, config: Any) -> int:
        return int(config.mm_tokens_per_image)

    def layer_mask(self, model: Any, kind: str, config: Any, hidden: torch.Tensor, mask2d: torch.Tensor, cache: Any,
                   layer: int, prompt_index: torch.Tensor, prefill: bool, base_kwargs: dict) -> Any:
        """At prefill, the causal (or sliding-window) mask or-ed with the kept image tokens' blocks; else the default."""
        token_types = base_kwargs.get("token_type_ids")
        if not prefill or token_types is None:
            return super().layer_mask(model, kind, config, hidden, mask2d, cache, layer, prompt_index, prefill, base_kwargs)
        from transformers.masking_utils import blockwise_overlay, create_causal_mask, sliding_window_overlay

        kept = token_types.to(prompt_index.device).gather(1, prompt_index) * mask2d[:, :prompt_index.shape[1]].to(prompt_index.device)
        blocks = block_ids(kept).to(hidden.device)
        if kind != "sliding_attention":
            return create_causal_mask(config, hidden, mask2d, cache, position_ids=None, block_sequence_ids=blocks, layer_idx=layer)
        return create_causal_mask(config, hidden, mask2d, cache, position_ids=None, or_mask_function=blockwise_overlay(blocks),
                                  and_mask_function=sliding_window_overlay(config.sliding_window), layer_idx=layer)


def block_ids(token_types: torch.Tensor) -> torch.Tensor:
    """(B, L) int: for each image token the index of its run of image tokens (``token_types == 1``), -1 elsewhere.

    Example:
        >>> block_ids(torch.tensor([[0, 1, 1, 0, 1]])).tolist()
        [[-1, 0, 0, -1, 1]]
    """
    image = token_types == 1
    starts = image & ~torch.nn.functional.pad(image, (1, 0))[:, :-1]
    return torch.where(image, starts.long().cumsum(dim=1) - 1, torch.full_like(token_types, -1))

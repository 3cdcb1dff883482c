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
passes none either).

Pre-LLM stages: each image is one view, the ``s × s`` grid of pooled tokens (``s² =
mm_tokens_per_image``). The one vision signal is ``"attention"``: the attention each encoder patch
receives at the feature layer (mean over heads and query patches; SigLIP has no CLS to read a row
of), recomputed from that layer's input and averaged over each token's ``k × k`` pooling window.
Stages that need a CLS token (``"features"``) or one token per encoder patch are refused with the
reason.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..errors import StageCannotRun
from .base import Encoded, Family, Signal, View, register_family
from .llava_onevision import siglip_signal_hooks


@register_family("gemma3")
class Gemma3Family(Family):
    """Gemma 3: one image run of ``mm_tokens_per_image`` tokens, sliding/global layers, bidirectional image blocks."""

    layer_kinds = ("full_attention", "sliding_attention")
    bidirectional_visual = True
    text_fields = Family.text_fields + ("sliding_window", "layer_types", "query_pre_attn_scalar", "rope_parameters")
    vision_fields = Family.vision_fields
    top_fields = Family.top_fields + ("mm_tokens_per_image", "boi_token_index", "eoi_token_index")
    vllm_refusal = "Gemma 3 is not served by the vLLM plugin yet; serve it with the HF runtime (runtime.load(recipe).apply(model))"

    pre_llm = True
    signals = {
        "attention": None,
        "features": "its SigLIP encoder has no CLS token",
        "encoder_patches": "its projector average-pools k × k encoder patches into one token",
    }

    def reference_visual_tokens(self, config: Any) -> int:
        return int(config.mm_tokens_per_image)

    # ------------------------------------------------------------------ pre-LLM stages
    def vision_layers(self, model: Any) -> torch.nn.ModuleList:
        """The SigLIP tower's ``encoder.layers`` (under ``vision_model`` in older transformers)."""
        tower = self.base_model(model).vision_tower
        encoder = getattr(tower, "encoder", None) or getattr(getattr(tower, "vision_model", None), "encoder", None)
        return encoder.layers

    def default_feature_layer(self, model: Any) -> int:
        return -1  # the projector reads the last layer (through the post-layernorm)

    def signal_hooks(self, model: Any, capture: set, feature_layer: int | None, record: Callable[[str, torch.Tensor], None]) -> list:
        return siglip_signal_hooks(self, model, capture, feature_layer, record)

    def views(self, model: Any, roles: Any, row: int, positions: torch.Tensor, encoded: Encoded, index: int,
              signal: Signal) -> list[View]:
        """One view per image: its ``s × s`` grid of pooled tokens; the signal pooled like the features."""
        config = model.config
        side = int(round(int(config.mm_tokens_per_image) ** 0.5))
        if positions.numel() != side * side:
            raise StageCannotRun(f"a Gemma 3 image has {positions.numel()} tokens, not the {side * side} of mm_tokens_per_image")
        view = View(row, positions, (side, side))
        attention = signal("attention")
        if attention is not None:
            patches = int(config.vision_config.image_size) // int(config.vision_config.patch_size)
            if index >= attention.shape[0] or attention.shape[1] != patches * patches:
                raise StageCannotRun(f"the encoder signal has {attention.shape[1]} patches, not {patches}²")
            grid = attention[index].float().view(1, 1, patches, patches)
            kernel = patches // side
            view.attention = torch.nn.functional.avg_pool2d(grid, kernel, kernel).flatten()
        return [view]

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
        if _boolean_masks(config) and (cache is None or cache.get_seq_length(layer) == 0) and mask2d.shape[1] == hidden.shape[1]:
            return sliding_block_mask(blocks, mask2d.to(hidden.device).bool(), config.sliding_window)
        return create_causal_mask(config, hidden, mask2d, cache, position_ids=None, or_mask_function=blockwise_overlay(blocks),
                                  and_mask_function=sliding_window_overlay(config.sliding_window), layer_idx=layer)


def _boolean_masks(config: Any) -> bool:
    """Whether the layers take transformers' boolean SDPA masks (True = attend)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    return ALL_MASK_ATTENTION_FUNCTIONS.get(config._attn_implementation) is sdpa_mask


def sliding_block_mask(blocks: torch.Tensor, padding: torch.Tensor, window: int) -> torch.Tensor:
    """(B, 1, L, L) bool: Gemma 3's sliding-layer prefill mask, ``window ∧ (causal ∨ same image block) ∧ key not padding``.

    What ``create_causal_mask`` builds from ``or_mask_function=blockwise_overlay`` and
    ``and_mask_function=sliding_window_overlay`` for a prefill on an empty cache, without the
    per-element ``vmap`` those custom functions force (about 6 ms of a 400-token prompt on one core).

    Example:
        >>> sliding_block_mask(torch.tensor([[-1, 0, 0, -1]]), torch.ones(1, 4, dtype=torch.bool), 2)[0, 0].int().tolist()
        [[1, 0, 0, 0], [1, 1, 1, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    """
    position = torch.arange(blocks.shape[1], device=blocks.device)
    offset = position[:, None] - position[None, :]  # query minus key
    same_block = (blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0)
    allowed = ((offset >= 0)[None] | same_block) & (offset < window)[None] & padding[:, None, :]
    return allowed[:, None]


def block_ids(token_types: torch.Tensor) -> torch.Tensor:
    """(B, L) int: for each image token the index of its run of image tokens (``token_types == 1``), -1 elsewhere.

    Example:
        >>> block_ids(torch.tensor([[0, 1, 1, 0, 1]])).tolist()
        [[-1, 0, 0, -1, 1]]
    """
    image = token_types == 1
    starts = image & ~torch.nn.functional.pad(image, (1, 0))[:, :-1]
    return torch.where(image, starts.long().cumsum(dim=1) - 1, torch.full_like(token_types, -1))


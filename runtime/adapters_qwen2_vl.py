"""Qwen2-VL and Qwen2.5-VL (``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``).

Layout in transformers 5.x: ``model.model`` (``Qwen2VLModel``) holds ``.visual`` and
``.language_model`` (``Qwen2VLTextModel`` with ``.layers``). Each image becomes one contiguous run
of ``<|image_pad|>`` placeholders (``config.image_token_id``), (t·h·w)/spatial_merge_size² of them,
so the count depends on the image's size (dynamic resolution).

**Positions (M-RoPE).** ``Qwen2VLModel`` computes the (t, h, w) positions of the whole, unpruned
prompt with ``get_rope_index`` before the decoder layers (``generate`` does it in
``_prepare_position_ids_for_generation`` and keeps ``rope_deltas`` on ``model.model``); the rotary
module mixes the three rows by ``mrope_section`` and hands every decoder layer (cos, sin) of shape
(B, L, head_dim) plus the text-position row as ``position_ids``, exactly like Llama. The pruner
gathers the kept rows of both at the pruning layer, so a kept visual token keeps its (t, h, w)
position, and ``get_rope_index`` never sees a pruned prompt. Decode steps get their positions from
``generate``'s own bookkeeping over the unpruned prompt (text position + ``rope_deltas``), which is
what the unpruned model would use.

**Reference image.** Dynamic resolution has no native image size, so a recipe's unit is a
reference image of 32 × 32 vision patches: 448 × 448 px for every released Qwen2-VL / Qwen2.5-VL
checkpoint (patch 14), ``(32 / spatial_merge_size)² = 256`` visual tokens. Other images scale the
recipe's ratios (``Recipe.keep_counts_for``).

**What may be pruned.** Image placeholders only. Video placeholders (``video_token_id``) are kept:
recipes are calibrated on images, and a keep ratio measured on still images says nothing about
video frames, whose tokens are redundant in time in a way images are not. They run unpruned and are
counted as non-visual tokens.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from .adapters import FamilyAdapter, _jsonable, register_adapter

REFERENCE_GRID_PATCHES = 32
"""Side of the reference image in vision patches (448 px at Qwen's 14-px patches)."""


@register_adapter("qwen2_vl", "qwen2_5_vl")
class Qwen2VLAdapter(FamilyAdapter):
    """Qwen2-VL / Qwen2.5-VL: image placeholders anywhere in the prompt, M-RoPE positions kept."""

    text_fields = FamilyAdapter.text_fields + ("layer_types",)
    vision_fields = (
        "depth", "embed_dim", "hidden_size", "intermediate_size", "mlp_ratio", "num_heads", "out_hidden_size",
        "in_channels", "patch_size", "spatial_merge_size", "temporal_patch_size", "hidden_act", "window_size",
        "fullatt_block_indexes", "tokens_per_second",
    )
    top_fields = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")

    def layers(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        text = self.text_config(model)
        if "sliding_attention" in (getattr(text, "layer_types", None) or ()):
            raise ValueError(
                "this Qwen-VL model has sliding-window attention layers (use_sliding_window=True), which the "
                "pruning runtime does not support; released Qwen2-VL / Qwen2.5-VL checkpoints have none"
            )
        return super().layers(model)

    def reference_visual_tokens(self, config: Any) -> int:
        """Visual tokens of a 32 × 32-patch image: (32 / spatial_merge_size)², 256 for released checkpoints."""
        merge = int(config.vision_config.spatial_merge_size)
        return (REFERENCE_GRID_PATCHES // merge) ** 2

    def prunable_visual_tokens(self, model: torch.nn.Module, input_ids: torch.Tensor, base_kwargs: dict) -> torch.Tensor:
        """Image placeholders; video placeholders are kept (see the module docstring)."""
        return input_ids == int(model.config.image_token_id)

    def fingerprint(self, model: torch.nn.Module) -> dict:
        """The base fingerprint, with M-RoPE's section split and theta folded into ``config_hash``.

        transformers 5.x normalises ``rope_scaling={"type": "mrope", ...}`` into ``rope_parameters``;
        only the numbers that change positions are hashed, so an old and a re-saved config agree.
        """
        found = super().fingerprint(model)
        rope = getattr(self.text_config(model), "rope_parameters", None) or {}
        mrope = {key: _jsonable(rope.get(key)) for key in ("mrope_section", "rope_theta", "rope_type")}
        combined = json.dumps({"base": found["config_hash"], "mrope": mrope}, sort_keys=True)
        found["config_hash"] = hashlib.sha256(combined.encode()).hexdigest()[:16]
        return found

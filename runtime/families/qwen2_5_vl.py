"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``, ``model_type == "qwen2_5_vl"``).

Everything the runtime knows of Qwen2-VL holds (:mod:`runtime.families.qwen2_vl`): the layout, M-RoPE
positions, the 256-token reference image, image placeholders only. The vision encoder differs:
outside ``fullatt_block_indexes`` its blocks attend within windows of reordered patches, so the
per-patch attention signal is not provided and only G-Prune (on the projected features) runs as a
pre-LLM stage.
"""
from __future__ import annotations

from .base import register_family
from .qwen2_vl import Qwen2VLFamily


@register_family("qwen2_5_vl")
class Qwen2_5VLFamily(Qwen2VLFamily):
    """Qwen2.5-VL: Qwen2-VL's layout with a window-attention encoder."""

    vllm_refusal = Qwen2VLFamily.vllm_refusal.replace("Qwen2-VL", "Qwen2.5-VL", 1)
    signals = {
        "attention": "its encoder attends within reordered windows, so patch attention is not supported",
        "features": "its vision encoder has no CLS token",
    }

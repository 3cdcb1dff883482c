"""Qwen2.5-VL in the compiler: embedded configs, ``tiny-qwen2.5-vl``, processor, window-attention vision FLOPs.

Sources of the embedded configs: ``Qwen/Qwen2.5-VL-3B-Instruct`` and ``Qwen/Qwen2.5-VL-7B-Instruct``
are their hub ``config.json`` files (the flat 4.41-era layout, as transformers 5.x still reads it).
Everything else is Qwen2-VL's (:mod:`.qwen2_vl`): the chat prompt, the special-token layout, the
processor (``Qwen2_5_VLProcessor`` here). The vision encoder attends within windows of
``window_size`` px outside ``fullatt_block_indexes`` and has a gated MLP.

Example:
    >>> from recipe_compiler.models import load_model
    >>> load_model("tiny-qwen2.5-vl").model.config.model_type
    'qwen2_5_vl'
"""
from __future__ import annotations

from typing import Any

from ..flops import VisionShape
from .base import ModelSpec, register_family
from .qwen2_vl import QWEN2_VL_PROMPT_TEMPLATE, QWEN_IDS, TINY_IDS, TINY_PIXELS, TINY_TEXT, Qwen2VLCompilerFamily, text_sizes

def _qwen2_5_vl_config(text: dict, max_window_layers: int, tie: bool, vocab: int) -> dict:
    """The flat config.json layout of Qwen/Qwen2.5-VL-{3B,7B}-Instruct."""
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        **QWEN_IDS,
        "hidden_act": "silu",
        **text,
        "initializer_range": 0.02,
        "max_position_embeddings": 128000,
        "max_window_layers": max_window_layers,
        "model_type": "qwen2_5_vl",
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": tie,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.41.2",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {
            "depth": 32,
            "hidden_act": "silu",
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "in_chans": 3,
            "out_hidden_size": text["hidden_size"],
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "window_size": 112,
            "fullatt_block_indexes": [7, 15, 23, 31],
            "tokens_per_second": 2,
            "temporal_patch_size": 2,
        },
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "vocab_size": vocab,
    }


_QWEN2_5_VL_3B_CONFIG = _qwen2_5_vl_config(text_sizes(2048, 11008, 16, 36, 2), max_window_layers=70, tie=True, vocab=151936)
_QWEN2_5_VL_7B_CONFIG = _qwen2_5_vl_config(text_sizes(3584, 18944, 28, 28, 4), max_window_layers=28, tie=False, vocab=152064)

_TINY_QWEN2_5_VL_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    **TINY_IDS,
    "tie_word_embeddings": False,
    "vision_config": {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "in_channels": 3,
        "out_hidden_size": 64,
        "patch_size": 4,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 32,  # 4×4 merged tokens per attention window, as 112 px is at patch 14
        "fullatt_block_indexes": [1],
        "tokens_per_second": 2,
        "hidden_act": "silu",
        **TINY_PIXELS,
    },
    "text_config": dict(TINY_TEXT),
}


SPECS = (
    ModelSpec(
        alias="qwen2.5-vl-3b",
        hub_id="Qwen/Qwen2.5-VL-3B-Instruct",
        config=_QWEN2_5_VL_3B_CONFIG,
        prompt_template=QWEN2_VL_PROMPT_TEMPLATE,
        description="Qwen2.5-VL 3B Instruct (Qwen2.5-3B + window-attention ViT, 256 visual tokens at 448 px)",
    ),
    ModelSpec(
        alias="qwen2.5-vl-7b",
        hub_id="Qwen/Qwen2.5-VL-7B-Instruct",
        config=_QWEN2_5_VL_7B_CONFIG,
        prompt_template=QWEN2_VL_PROMPT_TEMPLATE,
        description="Qwen2.5-VL 7B Instruct (Qwen2.5-7B + window-attention ViT, 256 visual tokens at 448 px)",
    ),
    ModelSpec(
        alias="tiny-qwen2.5-vl",
        hub_id=None,
        config=_TINY_QWEN2_5_VL_CONFIG,
        prompt_template=QWEN2_VL_PROMPT_TEMPLATE,
        description="built-in tiny random Qwen2.5-VL (window-attention ViT 2x32 patch 4, LM 8x64 GQA 4/2, M-RoPE, up to 256 visual tokens)",
    ),
)


@register_family("qwen2_5_vl")
class Qwen2_5VLCompilerFamily(Qwen2VLCompilerFamily):
    """Qwen2.5-VL: Qwen2-VL's processor and token layout; a window-attention ViT with a gated MLP."""

    specs = SPECS
    processor_class = "Qwen2_5_VLProcessor"

    def vision_shape(self, config: Any) -> VisionShape:
        """Windows of ``window_size / (merge · patch)`` merged tokens outside ``fullatt_block_indexes``; gated MLP."""
        vision = config.vision_config
        merge, patch = int(vision.spatial_merge_size), int(vision.patch_size)
        width = int(vision.hidden_size)
        merged = width * merge * merge
        return VisionShape(
            "grids", int(vision.depth), width, int(vision.intermediate_size), True, self._patch_inputs(vision),
            ((merged, merged), (merged, int(vision.out_hidden_size))), merge=merge,
            window=int(vision.window_size) // merge // patch, full_attention_layers=tuple(getattr(vision, "fullatt_block_indexes", None) or ()),
        )

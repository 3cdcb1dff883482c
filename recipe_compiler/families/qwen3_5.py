"""Qwen3.5 in the compiler: the 0.8B instruct checkpoint's embedded config, ``tiny-qwen3.5``, chat prompt, processor, vision FLOPs.

Source of the embedded config: ``Qwen/Qwen3.5-0.8B`` (the post-trained, instruct checkpoint; the
smallest of the Qwen3.5 line: 0.8B, 2B, 4B, 9B dense, 27B, and MoE models): 24 decoder layers in the
hybrid pattern ``[linear, linear, linear, full] × 6``, width 1024, MLP 3584, 8 query / 2 KV heads of
256 (gated attention output, q/k RMS norms, partial rotary 0.25, interleaved M-RoPE ``[11, 11, 10]``,
theta 1e7), Gated DeltaNet with 16 key and 16 value heads of 128 and a 4-tap conv, and a 12-block
768-wide ViT at 16-px patches (Qwen3-VL's, learned position grid of 48 × 48, no deepstack) merging
2 × 2 patches into 1024. The values were read from a published copy of that ``config.json``; the
hub file itself cannot be reached from this workplace. The 2B and larger checkpoints are not embedded
(their configs could not be checked here); load them by hub id.

Qwen3.5's processor is Qwen3-VL's (``Qwen3VLProcessor``, as transformers maps ``qwen3_5``); the
prompt and image settings are taken as Qwen3-VL's (:mod:`.qwen3_vl`). Qwen's special tokens keep their
layout relative to ``<|vision_start|>`` (``<|endoftext|>`` 9 below it), so the built-in tokenizer
places them at Qwen3.5's ids (248044…248057).

``qwen3_5_moe`` is not covered: its decoder layers are sparse mixtures of experts, which the FLOPs
model does not count (a dense MLP of ``intermediate_size`` would be wrong by the routed experts).

Example:
    >>> from recipe_compiler.models import load_model
    >>> load_model("tiny-qwen3.5").model.config.text_config.layer_types[:2]
    ['linear_attention', 'full_attention']
"""
from __future__ import annotations

import copy
from typing import Any

from ..flops import VisionShape
from .base import ModelSpec, register_family
from .qwen2_vl import TINY_IDS, TINY_PIXELS, TINY_TEXT
from .qwen3_vl import QWEN3_VL_PROMPT_TEMPLATE, Qwen3VLCompilerFamily

QWEN3_5_PROMPT_TEMPLATE = QWEN3_VL_PROMPT_TEMPLATE
"""Qwen3.5 single-turn prompt: taken as Qwen3-VL's (one image, one question, no system message)."""

QWEN3_5_IDS = {"image_token_id": 248056, "video_token_id": 248057, "vision_start_token_id": 248053, "vision_end_token_id": 248054}


def _hybrid(groups: int, linear_per_full: int) -> list[str]:
    return (["linear_attention"] * linear_per_full + ["full_attention"]) * groups


_QWEN3_5_0_8B_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen3_5ForConditionalGeneration"],
    "model_type": "qwen3_5",
    **QWEN3_5_IDS,
    "tie_word_embeddings": True,
    "text_config": {
        "model_type": "qwen3_5_text",
        "vocab_size": 248320,
        "hidden_size": 1024,
        "intermediate_size": 3584,
        "num_hidden_layers": 24,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 256,
        "hidden_act": "silu",
        "attention_bias": False,
        "attn_output_gate": True,
        "linear_num_key_heads": 16,
        "linear_num_value_heads": 16,
        "linear_key_head_dim": 128,
        "linear_value_head_dim": 128,
        "linear_conv_kernel_dim": 4,
        "rms_norm_eps": 1e-06,
        "full_attention_interval": 4,
        "layer_types": _hybrid(6, 3),
        "max_position_embeddings": 262144,
        "eos_token_id": 248044,
        "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "default", "mrope_interleaved": True, "mrope_section": [11, 11, 10],
                            "rope_theta": 10000000, "partial_rotary_factor": 0.25},
    },
    "vision_config": {
        "model_type": "qwen3_5_vision",
        "depth": 12,
        "hidden_size": 768,
        "num_heads": 12,
        "intermediate_size": 3072,
        "hidden_act": "gelu_pytorch_tanh",
        "in_channels": 3,
        "patch_size": 16,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "out_hidden_size": 1024,
        "num_position_embeddings": 2304,
    },
}

# tiny-qwen3.5: tiny-qwen2-vl's tokenizer and ids; 8 decoder layers alternating linear and full
# attention (layers 1, 3, 5, 7 are full, so cuts may enter layers 2, 4 and 6); a 2-block ViT.
_TINY_QWEN3_5_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen3_5ForConditionalGeneration"],
    "model_type": "qwen3_5",
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
        "num_position_embeddings": 256,
        "hidden_act": "gelu_pytorch_tanh",
        **TINY_PIXELS,
    },
    "text_config": {
        **{k: v for k, v in TINY_TEXT.items() if k not in ("rope_scaling", "rope_theta")},
        "head_dim": 16,
        "attn_output_gate": True,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "linear_key_head_dim": 8,
        "linear_value_head_dim": 12,
        "linear_conv_kernel_dim": 4,
        "layer_types": _hybrid(4, 1),
        "rope_parameters": {"rope_type": "default", "mrope_interleaved": True, "mrope_section": [2, 1, 1],
                            "rope_theta": 10000000.0, "partial_rotary_factor": 0.5},  # 8 rotary dims of 16
    },
}

SPECS = (
    ModelSpec(
        alias="qwen3.5-0.8b",
        hub_id="Qwen/Qwen3.5-0.8B",
        config=_QWEN3_5_0_8B_CONFIG,
        prompt_template=QWEN3_5_PROMPT_TEMPLATE,
        description="Qwen3.5 0.8B (24 layers: 18 Gated DeltaNet + 6 full attention; 12-block ViT, 256 visual tokens at 512 px)",
    ),
    ModelSpec(
        alias="tiny-qwen3.5",
        hub_id=None,
        config=_TINY_QWEN3_5_CONFIG,
        prompt_template=QWEN3_5_PROMPT_TEMPLATE,
        description="built-in tiny random Qwen3.5 (ViT 2x32 patch 4, LM 8x64 alternating Gated DeltaNet / full attention, up to 256 visual tokens)",
    ),
)


@register_family("qwen3_5")
class Qwen3_5CompilerFamily(Qwen3VLCompilerFamily):
    """Qwen3.5: Qwen3-VL's processor and ViT with a single merger (no deepstack)."""

    specs = SPECS
    prompt_template = QWEN3_5_PROMPT_TEMPLATE

    def vision_shape(self, config: Any) -> VisionShape:
        """Qwen3-VL's ViT over each frame with its one merger (``deepstack_visual_indexes`` is empty)."""
        return super().vision_shape(config)

    def resize_language_model(self, config: dict, text: dict) -> dict:
        """A copy with the language model resized: the merger into the new width, head_dim following it,
        the linear-attention heads at the same count, M-RoPE's sections scaled to the rotary pairs."""
        config = copy.deepcopy(config)
        heads = text.get("num_attention_heads", config["text_config"]["num_attention_heads"])
        config["text_config"].update(text)
        head_dim = text["hidden_size"] // heads
        config["text_config"]["head_dim"] = head_dim
        config["vision_config"]["out_hidden_size"] = text["hidden_size"]
        rope = config["text_config"]["rope_parameters"]
        pairs = int(head_dim * rope.get("partial_rotary_factor", 1.0)) // 2
        rope["mrope_section"] = [pairs - 2 * (pairs // 3), pairs // 3, pairs // 3]
        layers = config["text_config"]["num_hidden_layers"]
        period = config["text_config"].get("full_attention_interval", 4)
        config["text_config"]["layer_types"] = ["full_attention" if (i + 1) % period == 0 else "linear_attention" for i in range(layers)]
        return config

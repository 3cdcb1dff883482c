"""Embedded ``config.json`` files of the LLaVA-NeXT (LLaVA-1.6) registry aliases, and ``tiny-llava-next``.

Data only (no imports from the package), so :mod:`recipe_compiler.models` can import it without a
cycle.  Fields that are not given take the ``LlavaNextConfig`` / ``LlamaConfig`` / ``MistralConfig``
/ ``CLIPVisionConfig`` defaults, exactly as when transformers reads the file.

Sources: ``llava-hf/llava-v1.6-vicuna-7b-hf`` is its ``config.json`` verbatim (revision 78d9aec).
The ``mistral-7b`` and ``vicuna-13b`` entries carry the same fields as the ``llava-hf`` files, as
re-saved in several quantised copies of those snapshots (``_name_or_path`` and
``quantization_config`` left out); every architecture field agrees across the copies.
"""
from __future__ import annotations

from typing import Any

LLAVA_NEXT_MISTRAL_PROMPT_TEMPLATE = "[INST] <image>\n{prompt} [/INST]"
"""The LLaVA-1.6-Mistral single-turn prompt; ``{prompt}`` is replaced by the user's question."""

# The anyres grid pinpoints of every LLaVA-1.6 checkpoint: (height, width) in pixels.
_LLAVA_16_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]

_CLIP_VIT_L_14_336 = {
    "hidden_size": 1024,
    "image_size": 336,
    "intermediate_size": 4096,
    "model_type": "clip_vision_model",
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "patch_size": 14,
    "projection_dim": 768,
    "vocab_size": 32000,
}


def _llava_16(text_config: dict, **top: Any) -> dict:
    config: dict[str, Any] = {
        "architectures": ["LlavaNextForConditionalGeneration"],
        "ignore_index": -100,
        "image_grid_pinpoints": [list(p) for p in _LLAVA_16_PINPOINTS],
        "image_token_index": 32000,
        "model_type": "llava_next",
        "projector_hidden_act": "gelu",
        "text_config": text_config,
        "torch_dtype": "float16",
        "transformers_version": "4.39.0.dev0",
        "use_image_newline_parameter": True,
        "vision_config": dict(_CLIP_VIT_L_14_336),
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "vocab_size": 32064,
    }
    config.update(top)
    return config


# config.json of llava-hf/llava-v1.6-vicuna-7b-hf.
LLAVA_16_VICUNA_7B_CONFIG: dict[str, Any] = _llava_16(
    {
        "_name_or_path": "lmsys/vicuna-7b-v1.5",
        "architectures": ["LlamaForCausalLM"],
        "max_position_embeddings": 4096,
        "model_type": "llama",
        "pad_token_id": 0,
        "rms_norm_eps": 1e-05,
        "torch_dtype": "float16",
        "vocab_size": 32064,
    }
)

# config.json of llava-hf/llava-v1.6-mistral-7b-hf (Mistral-7B-Instruct-v0.2: GQA 32/8, no sliding window).
LLAVA_16_MISTRAL_7B_CONFIG: dict[str, Any] = _llava_16(
    {
        "_name_or_path": "mistralai/Mistral-7B-Instruct-v0.2",
        "architectures": ["MistralForCausalLM"],
        "intermediate_size": 14336,
        "max_position_embeddings": 32768,
        "model_type": "mistral",
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "torch_dtype": "bfloat16",
        "vocab_size": 32064,
    }
)

# config.json of llava-hf/llava-v1.6-vicuna-13b-hf.
LLAVA_16_VICUNA_13B_CONFIG: dict[str, Any] = _llava_16(
    {
        "_name_or_path": "lmsys/vicuna-13b-v1.5",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 5120,
        "intermediate_size": 13824,
        "max_length": 4096,
        "max_position_embeddings": 4096,
        "model_type": "llama",
        "num_attention_heads": 40,
        "num_hidden_layers": 40,
        "num_key_value_heads": 40,
        "pad_token_id": 0,
        "rms_norm_eps": 1e-05,
        "torch_dtype": "float16",
        "vocab_size": 32064,
    },
    tie_word_embeddings=False,
)

# tiny-llava-next: the tiny-llava tokenizer layout (<image>=259, <pad>=260, 261 tokens), a 32-px CLIP
# crop with 4-px patches (8x8 = 64 base tokens) and LLaVA-1.6's five pinpoint shapes scaled by
# 32/336.  A 64x64 image (the largest pinpoint, the recipe's reference) gives 64 base + 16x16 grid
# tokens + 16 row-end newlines = 336 placeholders, 320 of them prunable; other aspect ratios give
# fewer (e.g. a 451x300 photo → 64 + 10x16 + 10 newlines = 234).  The language model is
# tiny-llava's (Llama 8x64, GQA 4/2).
TINY_LLAVA_NEXT_CONFIG: dict[str, Any] = {
    "architectures": ["LlavaNextForConditionalGeneration"],
    "model_type": "llava_next",
    "image_grid_pinpoints": [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]],
    "image_seq_length": 64,
    "image_token_index": 259,
    "pad_token_id": 260,
    "projector_hidden_act": "gelu",
    "tie_word_embeddings": False,
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "vision_config": {
        "model_type": "clip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 4,
        "projection_dim": 32,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-05,
    },
    "text_config": {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 8,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-05,
        "vocab_size": 261,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 260,
        "tie_word_embeddings": False,
    },
}

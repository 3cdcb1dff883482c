"""Qwen2-VL and Qwen2.5-VL in the model registry: embedded configs, chat prompt, offline processor.

Importing this module registers the aliases ``qwen2-vl-2b``, ``qwen2-vl-7b``, ``qwen2.5-vl-3b``,
``qwen2.5-vl-7b`` and the built-in ``tiny-qwen2-vl`` in :data:`recipe_compiler.models.REGISTRY`, and
the ``qwen2_vl`` / ``qwen2_5_vl`` processor builders and prompt templates with the loader
(:mod:`recipe_compiler.models` imports it at its end, so ``load_model`` knows them).

Sources of the embedded configs: ``Qwen/Qwen2-VL-7B-Instruct``, ``Qwen/Qwen2.5-VL-3B-Instruct`` and
``Qwen/Qwen2.5-VL-7B-Instruct`` are their hub ``config.json`` files (the flat 4.41-era layout, as
transformers 5.x still reads it). ``Qwen/Qwen2-VL-2B-Instruct`` is its ``config.json`` with the same
layout as the 7B file and the 2B numbers (Qwen2-1.5B decoder, the 675M ViT projecting to 1536);
the architecture fields were checked against published copies and the parameter count (2.21e9).

The offline processor (random weights, no cached processor) is the family's own
``Qwen2VLProcessor`` / ``Qwen2_5_VLProcessor`` with ``Qwen2VLImageProcessorPil`` (no torchvision)
and the built-in byte-level tokenizer extended with Qwen's special tokens at Qwen's ids: the chat
tokens sit 8 and 7 ids below ``<|vision_start|>`` and ``<|endoftext|>`` (the pad) 9 below, as in
the real tokenizer. Image sizes follow the released ``preprocessor_config.json`` (min 3,136 px,
max 12,845,056 px) unless the vision config carries ``min_pixels`` / ``max_pixels`` (the built-in
tiny models do, to stay small).

Example:
    >>> from recipe_compiler.models import load_model
    >>> lm = load_model("tiny-qwen2-vl")
    >>> lm.format_prompt("Hi?").splitlines()[2]
    '<|im_start|>user'
"""
from __future__ import annotations

import functools
from typing import Any

from .models import (
    _CLIP_MEAN,
    _CLIP_STD,
    FAMILY_PROCESSOR_LOADERS,
    FAMILY_PROCESSORS,
    FAMILY_PROMPT_TEMPLATES,
    REGISTRY,
    LoadedModel,
    ModelSpec,
    _pad_id,
    build_random,
    builtin_tokenizer,
    load_model,
)

__all__ = [
    "QWEN2_VL_PROMPT_TEMPLATE",
    "TINY_QWEN2_5_VL_SPEC",
    "build_tiny_qwen2_5_vl",
    "build_tiny_qwen2_vl",
]

QWEN2_VL_PROMPT_TEMPLATE = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{prompt}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
"""Qwen2-VL / Qwen2.5-VL single-turn prompt, exactly what their chat template renders for one image
and one question (default system message included). The processor expands ``<|image_pad|>`` to the
image's token count."""

# Released checkpoints' preprocessor_config.json: min_pixels / max_pixels.
_MIN_PIXELS = 56 * 56
_MAX_PIXELS = 12845056

# Qwen2 tokenizer layout: <|endoftext|> 151643, <|im_start|> 151644, <|im_end|> 151645, …,
# <|vision_start|> 151652, <|vision_end|> 151653, <|vision_pad|> 151654, <|image_pad|> 151655,
# <|video_pad|> 151656.
_QWEN_IDS = {
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
}


def _qwen2_vl_config(text: dict, vision_hidden: int, tie: bool, vocab: int) -> dict:
    """The flat config.json layout of Qwen/Qwen2-VL-{2B,7B}-Instruct."""
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        **_QWEN_IDS,
        "hidden_act": "silu",
        **text,
        "initializer_range": 0.02,
        "max_position_embeddings": 32768,
        "max_window_layers": 28,
        "model_type": "qwen2_vl",
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
            "embed_dim": 1280,
            "mlp_ratio": 4,
            "num_heads": 16,
            "in_chans": 3,
            "hidden_size": vision_hidden,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "temporal_patch_size": 2,
        },
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "vocab_size": vocab,
    }


def _qwen2_5_vl_config(text: dict, max_window_layers: int, tie: bool, vocab: int) -> dict:
    """The flat config.json layout of Qwen/Qwen2.5-VL-{3B,7B}-Instruct."""
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        **_QWEN_IDS,
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


def _text(hidden: int, intermediate: int, heads: int, layers: int, kv_heads: int) -> dict:
    return {
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
    }


_QWEN2_VL_2B_CONFIG = _qwen2_vl_config(_text(1536, 8960, 12, 28, 2), vision_hidden=1536, tie=True, vocab=151936)
_QWEN2_VL_7B_CONFIG = _qwen2_vl_config(_text(3584, 18944, 28, 28, 4), vision_hidden=3584, tie=False, vocab=152064)
_QWEN2_5_VL_3B_CONFIG = _qwen2_5_vl_config(_text(2048, 11008, 16, 36, 2), max_window_layers=70, tie=True, vocab=151936)
_QWEN2_5_VL_7B_CONFIG = _qwen2_5_vl_config(_text(3584, 18944, 28, 28, 4), max_window_layers=28, tie=False, vocab=152064)

# tiny-qwen2-vl: byte tokenizer <unk>=0, <s>=1, </s>=2, bytes 3..258, then Qwen's special-token
# layout shifted down: <pad> (Qwen's <|endoftext|>) 259, <|im_start|> 260, <|im_end|> 261,
# <|vision_start|> 268, <|vision_end|> 269, <|image_pad|> 271, <|video_pad|> 272 (262..267 and 270
# stay unused, as in Qwen's tokenizer).
_TINY_VOCAB = 273
_TINY_IDS = {
    "vision_start_token_id": 268,
    "vision_end_token_id": 269,
    "image_token_id": 271,
    "video_token_id": 272,
}
# Images are resized to between 32² and 128² pixels: 4-px patches, 2×2 merged → at most 16×16 = 256
# visual tokens (the reference count), fewer for other aspect ratios.
_TINY_PIXELS = {"min_pixels": 32 * 32, "max_pixels": 128 * 128}
_TINY_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 8,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},  # head_dim 16 → 8 rotary pairs
    "vocab_size": _TINY_VOCAB,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 259,
    "tie_word_embeddings": False,
}

_TINY_QWEN2_VL_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen2VLForConditionalGeneration"],
    "model_type": "qwen2_vl",
    **_TINY_IDS,
    "tie_word_embeddings": False,
    "vision_config": {
        "depth": 2,
        "embed_dim": 32,
        "hidden_size": 64,
        "mlp_ratio": 2,
        "num_heads": 2,
        "in_channels": 3,
        "patch_size": 4,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "hidden_act": "quick_gelu",
        **_TINY_PIXELS,
    },
    "text_config": dict(_TINY_TEXT),
}

_TINY_QWEN2_5_VL_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    **_TINY_IDS,
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
        **_TINY_PIXELS,
    },
    "text_config": dict(_TINY_TEXT),
}

TINY_QWEN2_VL_ALIAS = "tiny-qwen2-vl"

_SPECS = [
    ModelSpec(
        alias="qwen2-vl-2b",
        hub_id="Qwen/Qwen2-VL-2B-Instruct",
        config=_QWEN2_VL_2B_CONFIG,
        prompt_template=QWEN2_VL_PROMPT_TEMPLATE,
        description="Qwen2-VL 2B Instruct (Qwen2-1.5B + 675M ViT, dynamic resolution, 256 visual tokens at 448 px)",
    ),
    ModelSpec(
        alias="qwen2-vl-7b",
        hub_id="Qwen/Qwen2-VL-7B-Instruct",
        config=_QWEN2_VL_7B_CONFIG,
        prompt_template=QWEN2_VL_PROMPT_TEMPLATE,
        description="Qwen2-VL 7B Instruct (Qwen2-7B + 675M ViT, dynamic resolution, 256 visual tokens at 448 px)",
    ),
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
        alias=TINY_QWEN2_VL_ALIAS,
        hub_id=None,
        config=_TINY_QWEN2_VL_CONFIG,
        prompt_template=QWEN2_VL_PROMPT_TEMPLATE,
        description="built-in tiny random Qwen2-VL (ViT 2x32 patch 4, LM 8x64 GQA 4/2, M-RoPE, up to 256 visual tokens)",
    ),
]

TINY_QWEN2_5_VL_SPEC = ModelSpec(
    alias="tiny-qwen2.5-vl",
    hub_id=None,
    config=_TINY_QWEN2_5_VL_CONFIG,
    prompt_template=QWEN2_VL_PROMPT_TEMPLATE,
    description="tiny random Qwen2.5-VL (window-attention ViT 2x32 patch 4, LM 8x64 GQA 4/2); not a registry alias",
)
"""A tiny Qwen2.5-VL for tests and benchmarks: ``build_random(TINY_QWEN2_5_VL_SPEC)``."""


def _builtin_qwen2_vl_processor(config: Any) -> Any:
    """``Qwen2VLProcessor`` / ``Qwen2_5_VLProcessor`` with the built-in tokenizer, sized from the config."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil, Qwen2VLProcessor

    text, vision = config.text_config, config.vision_config
    start = int(config.vision_start_token_id)
    special = {
        "<|im_start|>": start - 8,
        "<|im_end|>": start - 7,
        "<|vision_start|>": start,
        "<|vision_end|>": int(config.vision_end_token_id),
        "<|video_pad|>": int(config.video_token_id),
    }
    pad = _pad_id(config)
    tokenizer = builtin_tokenizer(
        vocab_size=int(text.vocab_size),
        image_token_id=int(config.image_token_id),
        pad_token_id=pad if pad is not None else start - 9,  # Qwen pads with <|endoftext|>
        image_token="<|image_pad|>",
        special_tokens=special,
    )
    tokenizer.model_max_length = int(getattr(text, "max_position_embeddings", 32768))
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=int(vision.patch_size),
        temporal_patch_size=int(vision.temporal_patch_size),
        merge_size=int(vision.spatial_merge_size),
        min_pixels=int(getattr(vision, "min_pixels", _MIN_PIXELS)),
        max_pixels=int(getattr(vision, "max_pixels", _MAX_PIXELS)),
        image_mean=list(_CLIP_MEAN),
        image_std=list(_CLIP_STD),
    )
    base = Qwen2_5_VLProcessor if config.model_type == "qwen2_5_vl" else Qwen2VLProcessor
    return _image_only(base)(image_processor=image_processor, tokenizer=tokenizer)


def _saved_qwen2_vl_processor(directory: Any, config: Any) -> Any:
    """A saved Qwen2-VL / Qwen2.5-VL processor, loaded without its video processor (no torchvision)."""
    from transformers import AutoTokenizer, Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil, Qwen2VLProcessor

    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(directory), local_files_only=True)
    base = Qwen2_5_VLProcessor if config.model_type == "qwen2_5_vl" else Qwen2VLProcessor
    return _image_only(base)(image_processor=image_processor, tokenizer=tokenizer)


@functools.lru_cache(maxsize=None)
def _image_only(base: type) -> type:
    """``base`` without its video processor.

    transformers 5.23 type-checks every processor attribute, and without torchvision the video
    processor's base class cannot be resolved, so ``Qwen2VLProcessor(..., video_processor=None)``
    raises. Processor attributes are read off ``__init__``'s signature; leaving ``video_processor``
    out of it makes an image + text processor that behaves exactly like ``base`` otherwise.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):  # noqa: N807
        base.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return type(base.__name__, (base,), {"__init__": __init__, "__module__": __name__, "__doc__": base.__doc__})


def build_tiny_qwen2_vl(seed: int = 0, attn_implementation: str = "sdpa") -> LoadedModel:
    """Build the built-in ``tiny-qwen2-vl`` (random, seeded) on CPU in fp32.

    Example:
        >>> lm = build_tiny_qwen2_vl()
        >>> lm.model.config.text_config.num_hidden_layers
        8
    """
    return load_model(TINY_QWEN2_VL_ALIAS, seed=seed, attn_implementation=attn_implementation)


def build_tiny_qwen2_5_vl(seed: int = 0, attn_implementation: str = "sdpa") -> LoadedModel:
    """Build :data:`TINY_QWEN2_5_VL_SPEC` (random, seeded) on CPU in fp32; same tokenizer as tiny-qwen2-vl."""
    return build_random(TINY_QWEN2_5_VL_SPEC, seed=seed, attn_implementation=attn_implementation)


REGISTRY.update({spec.alias: spec for spec in _SPECS})
for _model_type in ("qwen2_vl", "qwen2_5_vl"):
    FAMILY_PROCESSORS[_model_type] = _builtin_qwen2_vl_processor
    FAMILY_PROCESSOR_LOADERS[_model_type] = _saved_qwen2_vl_processor
    FAMILY_PROMPT_TEMPLATES[_model_type] = QWEN2_VL_PROMPT_TEMPLATE

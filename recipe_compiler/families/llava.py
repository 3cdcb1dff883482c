"""LLaVA-1.5 in the compiler: embedded configs, the built-in ``tiny-llava``, processor, prompt, vision FLOPs.

Aliases: ``llava-1.5-7b`` and ``llava-1.5-13b`` (their hub ``config.json`` files embedded as data,
so ``--random-weights`` builds the real architecture offline) and the built-in ``tiny-llava``, a
small, seeded, random but real ``LlavaForConditionalGeneration`` with an offline byte-level
tokenizer (576 visual tokens per image like LLaVA-1.5).

The vision encoder is a CLIP ViT run once per crop (one crop per LLaVA-1.5 image) on its patches
plus CLS; the projector maps the feature layer's patch tokens.

Example:
    >>> from recipe_compiler.models import load_model
    >>> load_model("tiny-llava").format_prompt("What is this?")
    'USER: <image>\\nWhat is this? ASSISTANT:'
"""
from __future__ import annotations

from typing import Any

import numpy as np

from runtime.families import FAMILIES as RUNTIME_FAMILIES

from ..flops import LMShape, VisionShape
from ..testbed.model import CONFIG as _TESTBED_CONFIG
from ..tokenizer import IMAGE_TOKEN, builtin_tokenizer
from .base import (CLIP_MEAN, CLIP_STD, CompilerFamily, ModelSpec, PictureView, one_crop_per_image_flops, pad_token_id,
                   register_family, square_picture_view)

LLAVA_15_PROMPT_TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"
"""The LLaVA-1.5 single-turn prompt; ``{prompt}`` is replaced by the user's question."""

__all__ = ["IMAGE_TOKEN", "LLAVA_15_PROMPT_TEMPLATE", "LlavaCompilerFamily"]

# CLIP ViT-L/14 at 336 px, as embedded in llava-hf/llava-1.5-{7b,13b}-hf/config.json.
CLIP_VIT_L_14_336 = {
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

# config.json of llava-hf/llava-1.5-7b-hf (fields not given take the LlamaConfig / CLIPVisionConfig
# defaults, exactly as when transformers reads the file).
_LLAVA_15_7B_CONFIG: dict[str, Any] = {
    "architectures": ["LlavaForConditionalGeneration"],
    "ignore_index": -100,
    "image_seq_length": 576,
    "image_token_index": 32000,
    "model_type": "llava",
    "pad_token_id": 32001,
    "projector_hidden_act": "gelu",
    "text_config": {
        "_name_or_path": "lmsys/vicuna-7b-v1.5",
        "architectures": ["LlamaForCausalLM"],
        "max_position_embeddings": 4096,
        "model_type": "llama",
        "rms_norm_eps": 1e-05,
        "torch_dtype": "float16",
        "vocab_size": 32064,
    },
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.36.0.dev0",
    "vision_config": dict(CLIP_VIT_L_14_336),
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "vocab_size": 32064,
}

# config.json of llava-hf/llava-1.5-13b-hf.
_LLAVA_15_13B_CONFIG: dict[str, Any] = {
    "architectures": ["LlavaForConditionalGeneration"],
    "ignore_index": -100,
    "image_seq_length": 576,
    "image_token_index": 32000,
    "model_type": "llava",
    "pad_token_id": 32001,
    "projector_hidden_act": "gelu",
    "text_config": {
        "_name_or_path": "lmsys/vicuna-13b-v1.5",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 5120,
        "intermediate_size": 13824,
        "max_position_embeddings": 4096,
        "model_type": "llama",
        "num_attention_heads": 40,
        "num_hidden_layers": 40,
        "num_key_value_heads": 40,
        "rms_norm_eps": 1e-05,
        "torch_dtype": "float16",
        "vocab_size": 32064,
    },
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.36.0.dev0",
    "vision_config": dict(CLIP_VIT_L_14_336),
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "vocab_size": 32064,
}

# tiny-llava: built-in tokenizer layout is <unk>=0, <s>=1, </s>=2, bytes 3..258, <image>=259,
# <pad>=260, so the vocabulary is exactly 261 tokens.
TINY_IMAGE_TOKEN_ID = 259
TINY_PAD_TOKEN_ID = 260
TINY_VOCAB_SIZE = 261

_TINY_LLAVA_CONFIG: dict[str, Any] = {
    "architectures": ["LlavaForConditionalGeneration"],
    "model_type": "llava",
    "image_seq_length": 64,
    "image_token_index": TINY_IMAGE_TOKEN_ID,
    "pad_token_id": TINY_PAD_TOKEN_ID,
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
        "image_size": 96,
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
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-05,
        "vocab_size": TINY_VOCAB_SIZE,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": TINY_PAD_TOKEN_ID,
        "tie_word_embeddings": False,
    },
}


def _testbed_tokenizer() -> Any:
    from ..testbed.vocab import testbed_tokenizer

    return testbed_tokenizer()


SPECS = (
    ModelSpec(
        alias="llava-1.5-7b",
        hub_id="llava-hf/llava-1.5-7b-hf",
        config=_LLAVA_15_7B_CONFIG,
        prompt_template=LLAVA_15_PROMPT_TEMPLATE,
        description="LLaVA-1.5 7B (Vicuna-7B + CLIP ViT-L/14-336, 576 visual tokens per image)",
    ),
    ModelSpec(
        alias="llava-1.5-13b",
        hub_id="llava-hf/llava-1.5-13b-hf",
        config=_LLAVA_15_13B_CONFIG,
        prompt_template=LLAVA_15_PROMPT_TEMPLATE,
        description="LLaVA-1.5 13B (Vicuna-13B + CLIP ViT-L/14-336, 576 visual tokens per image)",
    ),
    ModelSpec(
        alias="tiny-llava",
        hub_id=None,
        config=_TINY_LLAVA_CONFIG,
        prompt_template=LLAVA_15_PROMPT_TEMPLATE,
        description="built-in tiny random LLaVA (CLIP 2x32 @96px patch 4, Llama 8x64 GQA 4/2, 576 visual tokens like LLaVA-1.5)",
    ),
    ModelSpec(
        alias="testbed-llava",
        hub_id=None,
        config=_TESTBED_CONFIG,
        prompt_template=LLAVA_15_PROMPT_TEMPLATE,
        description="built-in trained accuracy testbed (CLIP 3x128 @224px patch 14 = 256 visual tokens, Llama 8x128 GQA 4/2, "
                    "word-level tokenizer; trained in-repo on the generated visual-QA task of recipe_compiler.testbed)",
        weights="testbed/weights/model.safetensors",
        tokenizer=_testbed_tokenizer,
    ),
)


def clip_image_processor(vision_config: Any) -> Any:
    """CLIP preprocessing (PIL backend: torchvision is not needed) for a square input size."""
    from transformers import CLIPImageProcessorPil

    size = int(vision_config.image_size)
    return CLIPImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        do_resize=True,
        do_center_crop=True,
        do_rescale=True,
        do_normalize=True,
        do_convert_rgb=True,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )


def llava_tokenizer(config: Any) -> Any:
    """The built-in tokenizer sized from a LLaVA-style config (``image_token_index``, vocabulary, positions)."""
    text = config.text_config
    tokenizer = builtin_tokenizer(
        vocab_size=int(text.vocab_size),
        image_token_id=int(config.image_token_index),
        pad_token_id=pad_token_id(config),
    )
    tokenizer.model_max_length = int(getattr(text, "max_position_embeddings", 4096))
    return tokenizer


@register_family("llava")
class LlavaCompilerFamily(CompilerFamily):
    """LLaVA-1.5: ``LlavaProcessor``, one CLIP crop per image."""

    specs = SPECS
    prompt_template = LLAVA_15_PROMPT_TEMPLATE

    def processor(self, config: Any, tokenizer: Any = None) -> Any:
        """``LlavaProcessor`` with the built-in tokenizer (or ``tokenizer``), sized from a ``LlavaConfig``."""
        from transformers import LlavaProcessor

        return LlavaProcessor(
            image_processor=clip_image_processor(config.vision_config),
            tokenizer=llava_tokenizer(config) if tokenizer is None else tokenizer,
            patch_size=int(config.vision_config.patch_size),
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            num_additional_image_tokens=1,  # CLIP's CLS token
        )

    def builtin_processor(self, spec: ModelSpec, config: Any) -> Any:
        """``LlavaProcessor`` with the spec's own tokenizer when it has one (``testbed-llava``'s word-level one)."""
        if spec.tokenizer is None:
            return self.processor(config)
        return LlavaCompilerFamily.processor(self, config, spec.tokenizer())

    def fix_processor(self, processor: Any, config: Any) -> Any:
        """Older llava-hf snapshots save no ``patch_size``; without it the processor cannot count image
        tokens. Fill the geometry in from the model config."""
        if getattr(processor, "patch_size", None) is None:
            processor.patch_size = int(config.vision_config.patch_size)
            processor.num_additional_image_tokens = 1
        if getattr(processor, "vision_feature_select_strategy", None) is None:
            processor.vision_feature_select_strategy = config.vision_feature_select_strategy
        return super().fix_processor(processor, config)

    def reference_crops(self, config: Any) -> int:
        """Crops the encoder runs for the family's reference image."""
        return 1

    def vision_shape(self, config: Any) -> VisionShape:
        """A CLIP ViT per crop on ``patches + 1`` tokens (CLS included); the projector maps
        ``projected_per_crop`` of them (the feature layer's patches, CLS too for strategy ``full``)."""
        vision = config.vision_config
        get = lambda obj, *names, default=None: next(  # noqa: E731
            (getattr(obj, n) for n in names if getattr(obj, n, None) is not None), default)
        channels = int(get(vision, "num_channels", "in_channels", "in_chans", default=3))
        patch = int(vision.patch_size)
        width = int(vision.hidden_size)
        patches = (int(vision.image_size) // patch) ** 2
        feature_layer = get(config, "vision_feature_layer", default=-2)
        n_features = 1 if isinstance(feature_layer, int) else len(feature_layer)
        text_hidden = int(LMShape.from_config(config.text_config).hidden)
        return VisionShape(
            "crops", int(vision.num_hidden_layers), width, int(vision.intermediate_size), False,
            channels * patch * patch, ((width * n_features, text_hidden), (text_hidden, text_hidden)),
            tokens_per_crop=patches + 1, projected_per_crop=RUNTIME_FAMILIES[config.model_type].crop_tokens(config),
            reference_crops=self.reference_crops(config),
        )

    def vision_flops_per_row(self, model: Any, inputs: dict, shape: VisionShape, image_token_id: int) -> np.ndarray:
        """One crop per image: ``projected_per_crop`` placeholders each."""
        return one_crop_per_image_flops(inputs, shape, image_token_id)

    def picture_views(self, model: Any, inputs: dict, positions: np.ndarray) -> list[PictureView]:
        """One view: the model's input image (the processor's square crop) under its ``side × side`` grid."""
        return square_picture_view(positions, "LLaVA-1.5")

"""InternVL 3 in the compiler: embedded configs, ``tiny-internvl``, chat prompt, offline processor, vision FLOPs.

Aliases ``internvl3-1b``, ``internvl3-2b`` and ``internvl3-8b`` are the transformers-native
``OpenGVLab/InternVL3-{1B,2B,8B}-hf`` checkpoints: InternViT-300M-448px (24 layers, width 1024, CLS,
448-px tiles of 14-px patches) and a pixel-shuffle MLP projector into a Qwen2.5 decoder (0.5B, 1.5B,
7B). The embedded ``config.json`` fields are the architecture the checkpoints publish (model
cards and the InternVL3 paper); fields not given take the ``InternVLConfig`` / ``Qwen2Config`` /
``InternVLVisionConfig`` defaults, as when transformers reads the file. The output heads are
untied (the checkpoints' totals are 0.94 B, 2.09 B and 7.94 B parameters, as the model cards'
0.9 B / 2.1 B / 7.9 B); ties are not part of any FLOPs figure.

The offline processor is the family's own ``InternVLProcessor`` (dynamic tiling with
``GotOcr2ImageProcessorPil``: up to 12 tiles plus a thumbnail, ImageNet normalisation, no
torchvision) with the built-in byte-level tokenizer extended with InternVL's special tokens at
Qwen2's layout relative to ``<IMG_CONTEXT>`` (``<img>``, ``</img>`` 2 and 1 below it, the chat
tokens 23 and 22 below, ``<|endoftext|>`` (the pad) 24 below, ``<video>`` 4 above).

The vision encoder runs once per tile on ``patches + 1`` tokens (CLS); the projector maps each
tile's ``patches / 4`` shuffled tokens (LayerNorm, then ``4w → d → d``). The tile geometry is the
runtime family's (:mod:`runtime.families.internvl`).

Example:
    >>> from recipe_compiler.models import load_model
    >>> load_model("tiny-internvl").format_prompt("Hi?").splitlines()[1]
    '<IMG_CONTEXT>'
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from runtime.families.internvl import tile_patches, tile_tokens

from ..errors import CompileError
from ..flops import LMShape, VisionShape, encoder_flops
from ..tokenizer import builtin_tokenizer
from .base import CompilerFamily, ModelSpec, PictureView, register_family
from .qwen2_vl import _image_only, text_sizes

INTERNVL_PROMPT_TEMPLATE = "<|im_start|>user\n<IMG_CONTEXT>\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
"""InternVL3-hf single-turn prompt (its chat template for one image and one question, no system
message); the processor expands ``<IMG_CONTEXT>`` to ``<img>`` + 256 per tile + ``</img>``."""

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
MAX_TILES = 12
"""Released preprocessor_config.json: ``max_patches`` (tiles besides the thumbnail)."""

# InternViT-300M-448px-V2.5, as in every InternVL3-{1B,2B,8B}-hf config.json.
INTERNVIT_300M = {
    "model_type": "internvl_vision",
    "attention_bias": True,
    "hidden_act": "gelu",
    "hidden_size": 1024,
    "image_size": [448, 448],
    "intermediate_size": 4096,
    "layer_norm_eps": 1e-06,
    "layer_scale_init_value": 0.1,
    "norm_type": "layer_norm",
    "num_attention_heads": 16,
    "num_channels": 3,
    "num_hidden_layers": 24,
    "patch_size": [14, 14],
    "use_absolute_position_embeddings": True,
    "use_mask_token": False,
    "use_mean_pooling": True,
    "use_qk_norm": False,
}


def _internvl3(text: dict, tie: bool) -> dict:
    return {
        "architectures": ["InternVLForConditionalGeneration"],
        "downsample_ratio": 0.5,
        "image_seq_length": 256,
        "image_token_id": 151667,
        "model_type": "internvl",
        "projector_hidden_act": "gelu",
        "text_config": {
            "architectures": ["Qwen2ForCausalLM"],
            "bos_token_id": 151643,
            "eos_token_id": 151645,
            "hidden_act": "silu",
            "max_position_embeddings": 32768,
            "model_type": "qwen2",
            "rms_norm_eps": 1e-06,
            "rope_theta": 1000000.0,
            "sliding_window": None,
            "tie_word_embeddings": tie,
            "torch_dtype": "bfloat16",
            "use_sliding_window": False,
            "vocab_size": 151674,
            **text,
        },
        "tie_word_embeddings": tie,
        "torch_dtype": "bfloat16",
        "vision_config": dict(INTERNVIT_300M),
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "default",
    }


_INTERNVL3_1B_CONFIG = _internvl3(text_sizes(896, 4864, 14, 24, 2), tie=False)  # Qwen2.5-0.5B
_INTERNVL3_2B_CONFIG = _internvl3(text_sizes(1536, 8960, 12, 28, 2), tie=False)  # Qwen2.5-1.5B
_INTERNVL3_8B_CONFIG = _internvl3(text_sizes(3584, 18944, 28, 28, 4), tie=False)  # Qwen2.5-7B

# tiny-internvl: byte tokenizer <unk>=0, <s>=1, </s>=2, bytes 3..258, then InternVL's special
# tokens at Qwen2's offsets from <IMG_CONTEXT>=283: <pad> (<|endoftext|>) 259, <|im_start|> 260,
# <|im_end|> 261, <img> 281, </img> 282, <video> 287. 64-px tiles of 4-px patches: 16×16 patches
# + CLS, pixel-shuffled to 8×8 = 64 tokens per tile (the recipe's unit); a 128×128 image is 2×2
# tiles + thumbnail = 320 tokens, a 192×64 one 3×1 + thumbnail = 256.
TINY_INTERNVL_CONFIG: dict[str, Any] = {
    "architectures": ["InternVLForConditionalGeneration"],
    "model_type": "internvl",
    "downsample_ratio": 0.5,
    "image_seq_length": 64,
    "image_token_id": 283,
    "projector_hidden_act": "gelu",
    "tie_word_embeddings": False,
    "vision_feature_layer": -1,
    "vision_feature_select_strategy": "default",
    "vision_config": {
        **INTERNVIT_300M,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": [64, 64],
        "patch_size": [4, 4],
    },
    "text_config": {
        "model_type": "qwen2",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 8,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "vocab_size": 288,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 259,
        "tie_word_embeddings": False,
        "use_sliding_window": False,
    },
}

SPECS = (
    ModelSpec("internvl3-1b", "OpenGVLab/InternVL3-1B-hf", _INTERNVL3_1B_CONFIG, INTERNVL_PROMPT_TEMPLATE,
              "InternVL3 1B (Qwen2.5-0.5B + InternViT-300M-448px, 256 visual tokens per 448-px tile, up to 12 tiles + thumbnail)"),
    ModelSpec("internvl3-2b", "OpenGVLab/InternVL3-2B-hf", _INTERNVL3_2B_CONFIG, INTERNVL_PROMPT_TEMPLATE,
              "InternVL3 2B (Qwen2.5-1.5B + InternViT-300M-448px, 256 visual tokens per 448-px tile)"),
    ModelSpec("internvl3-8b", "OpenGVLab/InternVL3-8B-hf", _INTERNVL3_8B_CONFIG, INTERNVL_PROMPT_TEMPLATE,
              "InternVL3 8B (Qwen2.5-7B + InternViT-300M-448px, 256 visual tokens per 448-px tile)"),
    ModelSpec("tiny-internvl", None, TINY_INTERNVL_CONFIG, INTERNVL_PROMPT_TEMPLATE,
              "built-in tiny random InternVL (InternViT 2x32 @64px tiles patch 4 + CLS, pixel shuffle to 64 tokens per tile, "
              "Qwen2 8x64 GQA 4/2)"),
)


def special_ids(config: Any) -> dict[str, int]:
    """InternVL's special tokens and their ids, at Qwen2's offsets from ``<IMG_CONTEXT>``."""
    context = int(config.image_token_id)
    return {"<|im_start|>": context - 23, "<|im_end|>": context - 22, "<img>": context - 2, "</img>": context - 1,
            "<video>": context + 4}


@register_family("internvl")
class InternVLCompilerFamily(CompilerFamily):
    """InternVL: ``InternVLProcessor`` (dynamic tiles) without its video processor; one ViT run per tile."""

    specs = SPECS
    prompt_template = INTERNVL_PROMPT_TEMPLATE

    def processor(self, config: Any) -> Any:
        """``InternVLProcessor`` with the built-in tokenizer and the PIL tiling image processor, left padding."""
        from transformers import GotOcr2ImageProcessorPil, InternVLProcessor

        text = config.text_config
        special = special_ids(config)
        pad = getattr(text, "pad_token_id", None)
        tokenizer = builtin_tokenizer(
            vocab_size=int(text.vocab_size),
            image_token_id=int(config.image_token_id),
            pad_token_id=pad if isinstance(pad, int) else int(config.image_token_id) - 24,
            image_token="<IMG_CONTEXT>",
            special_tokens=special,
        )
        tokenizer.model_max_length = int(getattr(text, "max_position_embeddings", 32768))
        for name, token in (("start_image_token", "<img>"), ("end_image_token", "</img>"),
                            ("context_image_token", "<IMG_CONTEXT>"), ("video_token", "<video>")):
            setattr(tokenizer, name, token)
            setattr(tokenizer, f"{name}_id", tokenizer.convert_tokens_to_ids(token))
        side = int(config.vision_config.image_size[0])
        image_processor = GotOcr2ImageProcessorPil(
            size={"height": side, "width": side}, crop_to_patches=True, min_patches=1, max_patches=MAX_TILES,
            do_resize=True, do_rescale=True, do_normalize=True, do_convert_rgb=True,
            image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
        )
        return _image_only(InternVLProcessor)(image_processor=image_processor, tokenizer=tokenizer,
                                              image_seq_length=tile_tokens(config))

    def vision_shape(self, config: Any) -> VisionShape:
        """InternViT per tile on ``patches + 1`` tokens; the projector maps the tile's shuffled tokens."""
        vision = config.vision_config
        patch = int(vision.patch_size[0])
        width = int(vision.hidden_size)
        folded = width * round(1 / float(config.downsample_ratio)) ** 2
        text_hidden = int(LMShape.from_config(config.text_config).hidden)
        return VisionShape(
            "crops", int(vision.num_hidden_layers), width, int(vision.intermediate_size), False,
            int(vision.num_channels) * patch * patch, ((folded, text_hidden), (text_hidden, text_hidden)),
            tokens_per_crop=tile_patches(config) ** 2 + 1, projected_per_crop=tile_tokens(config), reference_crops=1,
        )

    def vision_flops_per_row(self, model: Any, inputs: dict, shape: VisionShape, image_token_id: int) -> np.ndarray:
        """One encoder run per tile: ``projected_per_crop`` placeholders each."""
        counts = (inputs["input_ids"] == image_token_id).sum(dim=1).tolist()
        return np.array([encoder_flops(shape, crops=n // shape.projected_per_crop) for n in counts])

    def picture_views(self, model: Any, inputs: dict, positions: np.ndarray) -> list[PictureView]:
        """The tile that sees the whole picture: the only tile, or the thumbnail (the last one) of a tiled image.

        The tiles' arrangement is not in the model inputs, so the other tiles are not drawn.
        """
        per_tile = tile_tokens(model.config)
        n = int(positions.size)
        side = math.isqrt(per_tile)
        if n == 0 or n % per_tile:
            raise CompileError(f"this InternVL image has {n} visual tokens, not a multiple of {per_tile} per tile; "
                               "the picture needs one image per prompt")
        name = "" if n == per_tile else "thumbnail"
        return [PictureView(name, positions[-per_tile:].reshape(side, side), "original")]

    def resize_language_model(self, config: dict, text: dict) -> dict:
        """Qwen2's GQA layout (2 KV heads); the projector follows the new width by itself."""
        config = super().resize_language_model(config, text)
        config["text_config"]["num_key_value_heads"] = 2
        return config

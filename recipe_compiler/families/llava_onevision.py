"""LLaVA-OneVision in the compiler: embedded configs, ``tiny-llava-onevision``, chat prompt, processor, vision FLOPs.

Aliases ``llava-onevision-qwen2-0.5b-ov`` and ``llava-onevision-qwen2-7b-ov`` are the
transformers-native ``llava-hf/llava-onevision-qwen2-{0.5b,7b}-ov-hf`` checkpoints: SigLIP-SO400M
at 384 px (26 layers kept, width 1152, 14-px patches: 27×27 = 729 tokens per crop, no CLS,
strategy ``full``), a two-layer GELU projector, ``image_newline``, anyres over 36 pinpoints
(1–6 × 1–6 crops) with ``anyres_max_9`` downscaling, and a Qwen2 decoder (0.5B, 7B). The embedded
``config.json`` fields are those the checkpoints publish; fields not given take the
``LlavaOnevisionConfig`` / ``Qwen2Config`` / ``SiglipVisionConfig`` defaults, as when transformers
reads the file.

The offline processor is the family's own ``LlavaOnevisionProcessor`` with
``LlavaOnevisionImageProcessorPil`` (SigLIP's 0.5 normalisation, no torchvision) and the built-in
byte-level tokenizer extended with Qwen2's chat tokens at their offsets from ``<image>``
(``<|im_start|>``, ``<|im_end|>`` 2 and 1 below it, ``<|endoftext|>`` (the pad) 3 below,
``<video>`` 1 above). The geometry (crops per image, newlines, the downscaled grid) is the runtime
family's (:mod:`runtime.families.llava_onevision`).

Example:
    >>> from recipe_compiler.models import load_model
    >>> load_model("tiny-llava-onevision").format_prompt("Hi?")
    '<|im_start|>user <image>\\nHi?<|im_end|><|im_start|>assistant\\n'
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from runtime.families.llava_onevision import _multi_flags, image_crops, packed_layout, reference_size

from ..errors import CompileError
from ..flops import LMShape, VisionShape
from ..tokenizer import builtin_tokenizer
from .base import CompilerFamily, ModelSpec, PictureView, register_family
from .llava_next import LlavaNextCompilerFamily
from .qwen2_vl import _image_only, text_sizes

ONEVISION_PROMPT_TEMPLATE = "<|im_start|>user <image>\n{prompt}<|im_end|><|im_start|>assistant\n"
"""The llava-onevision-hf chat template's single-turn prompt for one image and one question."""

SIGLIP_MEAN = [0.5, 0.5, 0.5]
SIGLIP_STD = [0.5, 0.5, 0.5]

# The anyres pinpoints of every OneVision checkpoint: (height, width), 1–6 × 1–6 crops of 384 px.
_PINPOINTS = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]

# SigLIP-SO400M-patch14-384 with its last layer removed, as in both llava-onevision-*-ov-hf configs.
SIGLIP_SO400M = {
    "model_type": "siglip_vision_model",
    "hidden_size": 1152,
    "image_size": 384,
    "intermediate_size": 4304,
    "num_attention_heads": 16,
    "num_hidden_layers": 26,
    "patch_size": 14,
    "vision_use_head": False,
}


def _onevision(text: dict, tie: bool, vocab: int, name: str) -> dict:
    return {
        "architectures": ["LlavaOnevisionForConditionalGeneration"],
        "image_grid_pinpoints": [list(p) for p in _PINPOINTS],
        "image_token_index": 151646,
        "model_type": "llava_onevision",
        "projector_hidden_act": "gelu",
        "text_config": {
            "_name_or_path": name,
            "architectures": ["Qwen2ForCausalLM"],
            "bos_token_id": 151643,
            "eos_token_id": 151645,
            "max_position_embeddings": 32768,
            "model_type": "qwen2",
            "rms_norm_eps": 1e-06,
            "rope_theta": 1000000.0,
            "tie_word_embeddings": tie,
            "torch_dtype": "bfloat16",
            "use_sliding_window": False,
            "vocab_size": vocab,
            **text,
        },
        "tie_word_embeddings": tie,
        "torch_dtype": "float16",
        "use_image_newline_parameter": True,
        "video_token_index": 151647,
        "vision_aspect_ratio": "anyres_max_9",
        "vision_config": dict(SIGLIP_SO400M),
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "full",
    }


_OV_05B_CONFIG = _onevision(text_sizes(896, 4864, 14, 24, 2), tie=True, vocab=152000, name="Qwen/Qwen2-0.5B-Instruct")
_OV_7B_CONFIG = _onevision(text_sizes(3584, 18944, 28, 28, 4), tie=False, vocab=152128, name="Qwen/Qwen2-7B-Instruct")

# tiny-llava-onevision: byte tokenizer <unk>=0, <s>=1, </s>=2, bytes 3..258, then Qwen2's layout
# around <image>=262: <pad> (<|endoftext|>) 259, <|im_start|> 260, <|im_end|> 261, <video> 263.
# 32-px crops of 4-px patches (8×8 = 64 tokens, no CLS), the 36 pinpoints scaled by 32/384. A 64×64
# image: 64 base + 16×16 grid + 16 newlines; a 160×96 one (3×5 crops) is downscaled from 24×40 to
# 18×30 (anyres_max_9): 64 + 540 + 18 newlines; the reference (192×192) 64 + 24×24 = 640 prunable.
TINY_ONEVISION_CONFIG: dict[str, Any] = {
    "architectures": ["LlavaOnevisionForConditionalGeneration"],
    "model_type": "llava_onevision",
    "image_grid_pinpoints": [[32 * i, 32 * j] for i in range(1, 7) for j in range(1, 7)],
    "image_token_index": 262,
    "video_token_index": 263,
    "projector_hidden_act": "gelu",
    "tie_word_embeddings": False,
    "use_image_newline_parameter": True,
    "vision_aspect_ratio": "anyres_max_9",
    "vision_feature_layer": -1,
    "vision_feature_select_strategy": "full",
    "vision_config": {
        "model_type": "siglip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 2,
        "num_hidden_layers": 2,
        "image_size": 32,
        "patch_size": 4,
        "vision_use_head": False,
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
        "vocab_size": 264,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 259,
        "tie_word_embeddings": False,
        "use_sliding_window": False,
    },
}

SPECS = (
    ModelSpec("llava-onevision-qwen2-0.5b-ov", "llava-hf/llava-onevision-qwen2-0.5b-ov-hf", _OV_05B_CONFIG,
              ONEVISION_PROMPT_TEMPLATE, "LLaVA-OneVision 0.5B (Qwen2-0.5B + SigLIP-SO400M-384, anyres_max_9, 729 tokens per crop)"),
    ModelSpec("llava-onevision-qwen2-7b-ov", "llava-hf/llava-onevision-qwen2-7b-ov-hf", _OV_7B_CONFIG,
              ONEVISION_PROMPT_TEMPLATE, "LLaVA-OneVision 7B (Qwen2-7B + SigLIP-SO400M-384, anyres_max_9, 729 tokens per crop)"),
    ModelSpec("tiny-llava-onevision", None, TINY_ONEVISION_CONFIG, ONEVISION_PROMPT_TEMPLATE,
              "built-in tiny random LLaVA-OneVision (SigLIP 2x32 @32px crops patch 4, 36 anyres pinpoints, anyres_max_9, "
              "Qwen2 8x64 GQA 4/2; up to 640 visual tokens + newlines per image)"),
)


@register_family("llava_onevision")
class LlavaOnevisionCompilerFamily(LlavaNextCompilerFamily):
    """LLaVA-OneVision: ``LlavaOnevisionProcessor`` without its video processor; SigLIP per crop."""

    specs = SPECS
    prompt_template = ONEVISION_PROMPT_TEMPLATE

    def processor(self, config: Any) -> Any:
        """``LlavaOnevisionProcessor`` with the built-in tokenizer and the PIL anyres image processor, left padding."""
        from transformers import LlavaOnevisionImageProcessorPil, LlavaOnevisionProcessor

        text = config.text_config
        image = int(config.image_token_index)
        pad = getattr(text, "pad_token_id", None)
        tokenizer = builtin_tokenizer(
            vocab_size=int(text.vocab_size), image_token_id=image,
            pad_token_id=pad if isinstance(pad, int) and pad != image else image - 3,
            image_token="<image>",
            special_tokens={"<|im_start|>": image - 2, "<|im_end|>": image - 1, "<video>": int(config.video_token_index)},
        )
        tokenizer.model_max_length = int(getattr(text, "max_position_embeddings", 32768))
        size = int(config.vision_config.image_size)
        image_processor = LlavaOnevisionImageProcessorPil(
            size={"height": size, "width": size}, image_grid_pinpoints=[list(p) for p in config.image_grid_pinpoints],
            do_resize=True, do_rescale=True, do_normalize=True, do_convert_rgb=True, do_pad=True,
            image_mean=list(SIGLIP_MEAN), image_std=list(SIGLIP_STD),
        )
        return _image_only(LlavaOnevisionProcessor)(
            image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=self.crop_patches(config),
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            vision_aspect_ratio=getattr(config, "vision_aspect_ratio", "anyres_max_9"),
        )

    def fix_processor(self, processor: Any, config: Any) -> Any:
        return CompilerFamily.fix_processor(self, processor, config)

    @staticmethod
    def crop_patches(config: Any) -> int:
        return (int(config.vision_config.image_size) // int(config.vision_config.patch_size)) ** 2

    def reference_crops(self, config: Any) -> int:
        return image_crops(config, *reference_size(config))

    def vision_shape(self, config: Any) -> VisionShape:
        """SigLIP per crop on its patches (no CLS); the projector maps every patch (strategy ``full``)."""
        vision = config.vision_config
        patch = int(vision.patch_size)
        width = int(vision.hidden_size)
        layers = config.vision_feature_layer
        n_features = 1 if isinstance(layers, int) else len(layers)
        text_hidden = int(LMShape.from_config(config.text_config).hidden)
        patches = self.crop_patches(config)
        return VisionShape(
            "crops", int(vision.num_hidden_layers), width, int(vision.intermediate_size), False,
            int(getattr(vision, "num_channels", 3)) * patch * patch, ((width * n_features, text_hidden), (text_hidden, text_hidden)),
            tokens_per_crop=patches, projected_per_crop=patches, reference_crops=self.reference_crops(config), cls_tokens=0,
        )

    def image_crop_counts(self, config: Any, inputs: dict) -> list[int]:
        """Crops per image: anyres for an image alone in its prompt, the base crop for one among several."""
        sizes = inputs["image_sizes"].cpu().tolist()
        flags = _multi_flags(sizes, inputs.get("batch_num_images"))
        return [image_crops(config, h, w, multi) for (h, w), multi in zip(sizes, flags)]

    def picture_views(self, model: Any, inputs: dict, positions: np.ndarray) -> list[PictureView]:
        """The base view and the (unpadded, possibly downscaled) high-res grid, each over the original image."""
        height, width = (int(x) for x in inputs["image_sizes"][0].tolist())
        newline, _ = packed_layout(model.config, height, width)
        side = math.isqrt(self.crop_patches(model.config))
        rows = int(newline[side * side:].sum())
        n = int(positions.size)
        grid = n - side * side
        if rows == 0 or grid != int((~newline).sum()) - side * side or grid % rows:
            raise CompileError(f"this LLaVA-OneVision image has {n} prunable tokens, which do not form its "
                               f"{side}x{side} base + {rows}-row high-res layout; the picture needs one image per prompt")
        return [PictureView("base view", positions[: side * side].reshape(side, side), "original"),
                PictureView("high-res view", positions[side * side:].reshape(rows, grid // rows), "original")]

    def resize_language_model(self, config: dict, text: dict) -> dict:
        """Qwen2's GQA layout (2 KV heads); the projector follows the new width by itself."""
        config = super().resize_language_model(config, text)
        config["text_config"]["num_key_value_heads"] = 2
        return config

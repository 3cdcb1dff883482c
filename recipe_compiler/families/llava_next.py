"""LLaVA-NeXT (LLaVA-1.6, anyres) in the compiler: embedded configs, ``tiny-llava-next``, processor, vision FLOPs.

Sources of the embedded configs: ``llava-hf/llava-v1.6-vicuna-7b-hf`` is its ``config.json`` verbatim
(revision 78d9aec). The ``mistral-7b`` and ``vicuna-13b`` entries carry the same fields as the
``llava-hf`` files, as re-saved in several quantised copies of those snapshots (``_name_or_path``
and ``quantization_config`` left out); every architecture field agrees across the copies. Fields
that are not given take the ``LlavaNextConfig`` / ``LlamaConfig`` / ``MistralConfig`` /
``CLIPVisionConfig`` defaults, exactly as when transformers reads the file.

The anyres geometry (crops per image, the reference image, the base and high-resolution grids) is
the runtime family's (:mod:`runtime.families.llava_next`), read here for the vision FLOPs and the
kept-token pictures.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from runtime.families.llava_next import image_crops, reference_size, view_grids

from ..errors import CompileError
from ..flops import VisionShape, encoder_flops
from .base import CLIP_MEAN, CLIP_STD, ModelSpec, PictureView, register_family
from .llava import CLIP_VIT_L_14_336, LLAVA_15_PROMPT_TEMPLATE, LlavaCompilerFamily, llava_tokenizer

LLAVA_NEXT_MISTRAL_PROMPT_TEMPLATE = "[INST] <image>\n{prompt} [/INST]"
"""The LLaVA-1.6-Mistral single-turn prompt; ``{prompt}`` is replaced by the user's question."""

# The anyres grid pinpoints of every LLaVA-1.6 checkpoint: (height, width) in pixels.
_LLAVA_16_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]

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
        "vision_config": dict(CLIP_VIT_L_14_336),
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


SPECS = (
    ModelSpec(
        alias="llava-v1.6-vicuna-7b",
        hub_id="llava-hf/llava-v1.6-vicuna-7b-hf",
        config=LLAVA_16_VICUNA_7B_CONFIG,
        prompt_template=LLAVA_15_PROMPT_TEMPLATE,
        description="LLaVA-1.6 (NeXT) 7B (Vicuna-7B + CLIP ViT-L/14-336 anyres, up to 2880 visual tokens + 48 newlines per image)",
    ),
    ModelSpec(
        alias="llava-v1.6-mistral-7b",
        hub_id="llava-hf/llava-v1.6-mistral-7b-hf",
        config=LLAVA_16_MISTRAL_7B_CONFIG,
        prompt_template=LLAVA_NEXT_MISTRAL_PROMPT_TEMPLATE,
        description="LLaVA-1.6 (NeXT) Mistral 7B (Mistral-7B-Instruct-v0.2 GQA 32/8 + CLIP ViT-L/14-336 anyres)",
    ),
    ModelSpec(
        alias="llava-v1.6-vicuna-13b",
        hub_id="llava-hf/llava-v1.6-vicuna-13b-hf",
        config=LLAVA_16_VICUNA_13B_CONFIG,
        prompt_template=LLAVA_15_PROMPT_TEMPLATE,
        description="LLaVA-1.6 (NeXT) 13B (Vicuna-13B + CLIP ViT-L/14-336 anyres)",
    ),
    ModelSpec(
        alias="tiny-llava-next",
        hub_id=None,
        config=TINY_LLAVA_NEXT_CONFIG,
        prompt_template=LLAVA_15_PROMPT_TEMPLATE,
        description="built-in tiny random LLaVA-NeXT (CLIP 2x32 @32px crops patch 4, 5 anyres pinpoints up to 64x64, "
        "Llama 8x64 GQA 4/2; up to 320 visual tokens + 16 newlines per image)",
    ),
)


@register_family("llava_next")
class LlavaNextCompilerFamily(LlavaCompilerFamily):
    """LLaVA-NeXT: ``LlavaNextProcessor`` (anyres), base + grid crops per image."""

    specs = SPECS

    def processor(self, config: Any) -> Any:
        """``LlavaNextProcessor`` with the built-in tokenizer and the PIL anyres image processor (no torchvision).

        Sized from a ``LlavaNextConfig``: crops of ``vision_config.image_size``, the config's grid
        pinpoints, CLIP normalisation. Returns ``image_sizes`` and 5D ``pixel_values`` (image, crop,
        C, H, W); pads on the left.
        """
        from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

        size = int(config.vision_config.image_size)
        image_processor = LlavaNextImageProcessorPil(
            size={"shortest_edge": size},
            crop_size={"height": size, "width": size},
            image_grid_pinpoints=[list(p) for p in config.image_grid_pinpoints],
            do_resize=True,
            do_center_crop=True,
            do_rescale=True,
            do_normalize=True,
            do_convert_rgb=True,
            do_pad=True,
            image_mean=list(CLIP_MEAN),
            image_std=list(CLIP_STD),
        )
        return LlavaNextProcessor(
            image_processor=image_processor,
            tokenizer=llava_tokenizer(config),
            patch_size=int(config.vision_config.patch_size),
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            num_additional_image_tokens=1,  # CLIP's CLS token
        )

    def reference_crops(self, config: Any) -> int:
        """Base + grid crops of the reference image (the largest pinpoint: 5 for LLaVA-1.6)."""
        return image_crops(config, *reference_size(config))

    def vision_flops_per_row(self, model: Any, inputs: dict, shape: VisionShape, image_token_id: int) -> np.ndarray:
        """Base + grid crops per image, from ``image_sizes`` (as transformers splits them); images are
        matched to rows by runs of image tokens."""
        if "image_sizes" not in inputs:
            return super().vision_flops_per_row(model, inputs, shape, image_token_id)
        is_image = (inputs["input_ids"] == image_token_id).cpu()
        crops = self.image_crop_counts(model.config, inputs)
        starts = is_image & ~torch.nn.functional.pad(is_image, (1, 0))[:, :-1]  # first token of each run
        out, next_image = [], 0
        for runs in starts.sum(dim=1).tolist():
            out.append(encoder_flops(shape, crops=sum(crops[next_image:next_image + runs])))
            next_image += runs
        return np.array(out)

    def image_crop_counts(self, config: Any, inputs: dict) -> list[int]:
        """Crops the encoder runs for each image of the processor's ``inputs`` (from ``image_sizes``)."""
        return [image_crops(config, h, w) for h, w in inputs["image_sizes"].cpu().tolist()]

    def picture_views(self, model: Any, inputs: dict, positions: np.ndarray) -> list[PictureView]:
        """Two views, each over the original image: the base view (the whole image squashed to one
        crop) and the high-resolution grid after ``unpad_image`` (newlines are not drawn)."""
        height, width = (int(x) for x in inputs["image_sizes"][0].tolist())
        (side, _), (rows, cols) = view_grids(model.config, height, width)
        n = int(positions.size)
        if n != side * side + rows * cols:
            raise CompileError(f"this LLaVA-NeXT image has {n} prunable tokens, but its layout ({side}x{side} base + "
                               f"{rows}x{cols} high-res) gives {side * side + rows * cols}; the picture needs the "
                               "'default' feature strategy and one image per prompt")
        return [PictureView("base view", positions[: side * side].reshape(side, side), "original"),
                PictureView("high-res view", positions[side * side:].reshape(rows, cols), "original")]

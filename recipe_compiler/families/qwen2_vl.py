"""Qwen2-VL in the compiler: embedded configs, ``tiny-qwen2-vl``, chat prompt, offline processor, vision FLOPs.

Sources of the embedded configs: ``Qwen/Qwen2-VL-7B-Instruct`` is its hub ``config.json`` (the flat
4.41-era layout, as transformers 5.x still reads it). ``Qwen/Qwen2-VL-2B-Instruct`` is its
``config.json`` with the same layout as the 7B file and the 2B numbers (Qwen2-1.5B decoder, the 675M
ViT projecting to 1536); the architecture fields were checked against published copies and the
parameter count (2.21e9).

The offline processor (random weights, no cached processor) is the family's own
``Qwen2VLProcessor`` with ``Qwen2VLImageProcessorPil`` (no torchvision) and the built-in byte-level
tokenizer extended with Qwen's special tokens at Qwen's ids: the chat tokens sit 8 and 7 ids below
``<|vision_start|>`` and ``<|endoftext|>`` (the pad) 9 below, as in the real tokenizer. Image sizes
follow the released ``preprocessor_config.json`` (min 3,136 px, max 12,845,056 px) unless the vision
config carries ``min_pixels`` / ``max_pixels`` (the built-in tiny models do, to stay small).

The vision encoder is a ViT over each image's ``t·h·w`` patches, attending within each frame; the
merger maps every ``merge²`` patches to one token.

Example:
    >>> from recipe_compiler.models import load_model
    >>> lm = load_model("tiny-qwen2-vl")
    >>> lm.format_prompt("Hi?").splitlines()[2]
    '<|im_start|>user'
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy as np

from ..errors import CompileError
from ..flops import VisionShape, encoder_flops
from ..tokenizer import builtin_tokenizer
from .base import CLIP_MEAN, CLIP_STD, CompilerFamily, ModelSpec, PictureView, pad_token_id, register_family

__all__ = ["QWEN2_VL_PROMPT_TEMPLATE", "Qwen2VLCompilerFamily", "image_grid"]

QWEN2_VL_PROMPT_TEMPLATE = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{prompt}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
"""Qwen2-VL / Qwen2.5-VL single-turn prompt, exactly what their chat template renders for one image
and one question (default system message included). The processor expands ``<|image_pad|>`` to the
image's token count."""

# Released checkpoints' preprocessor_config.json: min_pixels / max_pixels.
MIN_PIXELS = 56 * 56
MAX_PIXELS = 12845056

# Qwen2 tokenizer layout: <|endoftext|> 151643, <|im_start|> 151644, <|im_end|> 151645, …,
# <|vision_start|> 151652, <|vision_end|> 151653, <|vision_pad|> 151654, <|image_pad|> 151655,
# <|video_pad|> 151656.
QWEN_IDS = {
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
        **QWEN_IDS,
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


def text_sizes(hidden: int, intermediate: int, heads: int, layers: int, kv_heads: int) -> dict:
    return {
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
    }


_QWEN2_VL_2B_CONFIG = _qwen2_vl_config(text_sizes(1536, 8960, 12, 28, 2), vision_hidden=1536, tie=True, vocab=151936)
_QWEN2_VL_7B_CONFIG = _qwen2_vl_config(text_sizes(3584, 18944, 28, 28, 4), vision_hidden=3584, tie=False, vocab=152064)

# tiny-qwen2-vl: byte tokenizer <unk>=0, <s>=1, </s>=2, bytes 3..258, then Qwen's special-token
# layout shifted down: <pad> (Qwen's <|endoftext|>) 259, <|im_start|> 260, <|im_end|> 261,
# <|vision_start|> 268, <|vision_end|> 269, <|image_pad|> 271, <|video_pad|> 272 (262..267 and 270
# stay unused, as in Qwen's tokenizer).
TINY_VOCAB = 273
TINY_IDS = {
    "vision_start_token_id": 268,
    "vision_end_token_id": 269,
    "image_token_id": 271,
    "video_token_id": 272,
}
# Images are resized to between 32² and 128² pixels: 4-px patches, 2×2 merged → at most 16×16 = 256
# visual tokens (the reference count), fewer for other aspect ratios.
TINY_PIXELS = {"min_pixels": 32 * 32, "max_pixels": 128 * 128}
TINY_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 8,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},  # head_dim 16 → 8 rotary pairs
    "vocab_size": TINY_VOCAB,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 259,
    "tie_word_embeddings": False,
}

_TINY_QWEN2_VL_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen2VLForConditionalGeneration"],
    "model_type": "qwen2_vl",
    **TINY_IDS,
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
        **TINY_PIXELS,
    },
    "text_config": dict(TINY_TEXT),
}


SPECS = (
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
        alias="tiny-qwen2-vl",
        hub_id=None,
        config=_TINY_QWEN2_VL_CONFIG,
        prompt_template=QWEN2_VL_PROMPT_TEMPLATE,
        description="built-in tiny random Qwen2-VL (ViT 2x32 patch 4, LM 8x64 GQA 4/2, M-RoPE, up to 256 visual tokens)",
    ),
)


def image_grid(grid_thw: Sequence[int], merge: int) -> tuple[int, int]:
    """The merged-token grid of one Qwen-VL image: ``(grid_h / merge, grid_w / merge)``.

    Args:
        grid_thw: the image's row of the processor's ``image_grid_thw`` (patches in time, height, width).
        merge: ``vision_config.spatial_merge_size``.

    Example:
        >>> image_grid((1, 10, 22), 2)
        (5, 11)
    """
    t, h, w = (int(x) for x in grid_thw)
    if t != 1 or h % merge or w % merge:
        raise CompileError(f"image_grid_thw {(t, h, w)} is not one still image in {merge}x{merge} merge blocks; "
                           "the kept-token picture needs an image, not a video")
    return h // merge, w // merge


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


@register_family("qwen2_vl")
class Qwen2VLCompilerFamily(CompilerFamily):
    """Qwen2-VL: ``Qwen2VLProcessor`` without its video processor; a ViT over patch grids."""

    specs = SPECS
    prompt_template = QWEN2_VL_PROMPT_TEMPLATE
    processor_class = "Qwen2VLProcessor"
    """The transformers processor class (its video processor left out, see :func:`_image_only`)."""

    def _processor_class(self) -> type:
        import transformers

        return _image_only(getattr(transformers, self.processor_class))

    def processor(self, config: Any) -> Any:
        """The family's processor with the built-in tokenizer, sized from the config."""
        from transformers import Qwen2VLImageProcessorPil

        text, vision = config.text_config, config.vision_config
        start = int(config.vision_start_token_id)
        special = {
            "<|im_start|>": start - 8,
            "<|im_end|>": start - 7,
            "<|vision_start|>": start,
            "<|vision_end|>": int(config.vision_end_token_id),
            "<|video_pad|>": int(config.video_token_id),
        }
        pad = pad_token_id(config)
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
            min_pixels=int(getattr(vision, "min_pixels", MIN_PIXELS)),
            max_pixels=int(getattr(vision, "max_pixels", MAX_PIXELS)),
            image_mean=list(CLIP_MEAN),
            image_std=list(CLIP_STD),
        )
        return self._processor_class()(image_processor=image_processor, tokenizer=tokenizer)

    def saved_processor(self, directory: Any, config: Any) -> Any:
        """A saved processor, loaded without its video processor (which needs torchvision)."""
        from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(directory), local_files_only=True)
        return self._processor_class()(image_processor=image_processor, tokenizer=tokenizer)

    def vision_shape(self, config: Any) -> VisionShape:
        """A ViT over each image's patches, attention within each frame; the merger maps every
        ``merge²`` patches to one token."""
        vision = config.vision_config
        merge = int(vision.spatial_merge_size)
        width = int(vision.embed_dim)
        merged = width * merge * merge
        return VisionShape(
            "grids", int(vision.depth), width, int(width * float(vision.mlp_ratio)), False, self._patch_inputs(vision),
            ((merged, merged), (merged, int(vision.hidden_size))), merge=merge,
        )

    @staticmethod
    def _patch_inputs(vision: Any) -> int:
        """Pixel values per patch: channels · temporal patch · patch²."""
        channels = next((int(getattr(vision, n)) for n in ("num_channels", "in_channels", "in_chans") if getattr(vision, n, None) is not None), 3)
        temporal = int(getattr(vision, "temporal_patch_size", None) or 2)
        return channels * temporal * int(vision.patch_size) ** 2

    def vision_flops_per_row(self, model: Any, inputs: dict, shape: VisionShape, image_token_id: int) -> np.ndarray:
        """Each image's ``image_grid_thw`` patches; images are matched to rows by their merged-token counts."""
        counts = (inputs["input_ids"] == image_token_id).sum(dim=1).tolist()
        grids = inputs.get("image_grid_thw")
        grids = [] if grids is None else grids.cpu().tolist()
        unit = shape.merge * shape.merge
        out, next_image = [], 0
        for n in counts:
            mine = []
            while n > 0 and next_image < len(grids):
                t, h, w = grids[next_image]
                mine.append(grids[next_image])
                n -= t * h * w // unit
                next_image += 1
            out.append(encoder_flops(shape, grids=mine) if mine else 0.0)
        return np.array(out)

    def picture_views(self, model: Any, inputs: dict, positions: np.ndarray) -> list[PictureView]:
        """One view: the processor-resized image (``grid_w·patch × grid_h·patch`` px, what the vision
        encoder saw) under its ``grid_h/merge × grid_w/merge`` grid of merged tokens."""
        vision = model.config.vision_config
        merge = int(vision.spatial_merge_size)
        rows, cols = image_grid(inputs["image_grid_thw"][0].tolist(), merge)
        n = int(positions.size)
        if n != rows * cols:
            raise CompileError(f"this Qwen-VL prompt has {n} image tokens but its image_grid_thw gives {rows}x{cols}; "
                               "the picture needs exactly one image per prompt")
        step = merge * int(vision.patch_size)  # pixels per merged token
        return [PictureView("", positions.reshape(rows, cols), (cols * step, rows * step))]

    def resize_language_model(self, config: dict, text: dict) -> dict:
        """Qwen2's GQA layout (2 KV heads), the merger projecting into the new width, M-RoPE's
        section split scaled to the new head size."""
        config = super().resize_language_model(config, text)
        config["text_config"]["num_key_value_heads"] = 2
        vision = config["vision_config"]
        # The vision merger projects into the LM's width (Qwen2-VL: hidden_size; Qwen2.5-VL: out_hidden_size).
        vision["out_hidden_size" if "out_hidden_size" in vision else "hidden_size"] = text["hidden_size"]
        heads = text.get("num_attention_heads", config["text_config"].get("num_attention_heads"))
        pairs = text["hidden_size"] // heads // 2
        for rope in (config["text_config"].get("rope_scaling"), config["text_config"].get("rope_parameters")):
            if isinstance(rope, dict) and "mrope_section" in rope:
                rope["mrope_section"] = [pairs // 4, 3 * pairs // 8, 3 * pairs // 8]  # as Qwen2-VL-7B splits its 64
        return config

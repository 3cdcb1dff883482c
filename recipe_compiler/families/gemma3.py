"""Gemma 3 in the compiler: the 4B and 12B instruct checkpoints' embedded configs, ``tiny-gemma3``, prompt, processor, vision FLOPs.

Sources of the embedded configs: ``google/gemma-3-4b-it`` and ``google/gemma-3-12b-it`` (gated on
the hub; the values were read from published copies of their ``config.json``, as
``transformers`` reads them: fields not given take ``Gemma3TextConfig`` / ``SiglipVisionConfig``
defaults). Both have a SigLIP-So400m tower (27 × 1152, 896 px at patch 14: 64 × 64 patches, no
CLS) average-pooled 4 × 4 into ``mm_tokens_per_image = 256`` tokens and projected by one matrix;
the language model repeats 5 ``sliding_attention`` layers (window 1024, local RoPE theta 1e4)
and 1 ``full_attention`` layer (global RoPE theta 1e6, linear scaling 8); query/key RMS norms;
head_dim 256. The 4B: 34 layers of 2560 (MLP 10240, 8 query / 4 KV heads); the 12B: 48 layers of
3840 (MLP 15360, 16 / 8 heads).

The prompt is Gemma 3's chat turn with the image first. ``<start_of_image>`` in a prompt is what
``Gemma3Processor`` expands into ``\\n\\n<start_of_image>`` + 256 × ``<image_soft_token>`` +
``<end_of_image>\\n\\n`` (pan-and-scan off: one crop per image, every image resized to the tower's
square input), and it returns ``token_type_ids`` marking the image tokens, which the model needs
to let one image's tokens attend to each other both ways. The built-in tokenizer places the
special tokens at Gemma's ids.

Example:
    >>> from recipe_compiler.models import load_model
    >>> load_model("tiny-gemma3").format_prompt("What is this?")
    '<start_of_turn>user\\n<start_of_image>What is this?<end_of_turn>\\n<start_of_turn>model\\n'
"""
from __future__ import annotations

import copy
from typing import Any

import numpy as np

from ..flops import VisionShape
from ..tokenizer import builtin_tokenizer
from .base import (CompilerFamily, ModelSpec, PictureView, image_token_id, one_crop_per_image_flops, pad_token_id, register_family,
                   square_picture_view)

GEMMA3_PROMPT_TEMPLATE = "<start_of_turn>user\n<start_of_image>{prompt}<end_of_turn>\n<start_of_turn>model\n"
"""Gemma 3 single-turn prompt (one image, then the question), as its chat template writes it."""

IMAGE_SOFT_TOKEN, BOI_TOKEN, EOI_TOKEN = "<image_soft_token>", "<start_of_image>", "<end_of_image>"
TURN_TOKENS = {"<start_of_turn>": 105, "<end_of_turn>": 106}
"""Gemma's chat-turn tokens and their ids."""

# SigLIP-So400m at 896 px, as in both checkpoints' config.json.
_SIGLIP_896 = {
    "hidden_size": 1152,
    "image_size": 896,
    "intermediate_size": 4304,
    "model_type": "siglip_vision_model",
    "num_attention_heads": 16,
    "num_hidden_layers": 27,
    "patch_size": 14,
    "vision_use_head": False,
}

_GEMMA3_TOP = {
    "architectures": ["Gemma3ForConditionalGeneration"],
    "boi_token_index": 255999,
    "eoi_token_index": 256000,
    "eos_token_id": [1, 106],
    "image_token_index": 262144,
    "initializer_range": 0.02,
    "mm_tokens_per_image": 256,
    "model_type": "gemma3",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.50.0.dev0",
}

_GEMMA3_4B_CONFIG: dict[str, Any] = {
    **_GEMMA3_TOP,
    "text_config": {
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "model_type": "gemma3_text",
        "num_hidden_layers": 34,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "sliding_window": 1024,
    },
    "vision_config": dict(_SIGLIP_896),
}

_GEMMA3_12B_CONFIG: dict[str, Any] = {
    **_GEMMA3_TOP,
    "text_config": {
        "hidden_size": 3840,
        "intermediate_size": 15360,
        "model_type": "gemma3_text",
        "num_attention_heads": 16,
        "num_hidden_layers": 48,
        "num_key_value_heads": 8,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "sliding_window": 1024,
    },
    "vision_config": dict(_SIGLIP_896),
}

# tiny-gemma3: a 300-token vocabulary with Gemma's token roles (pad 0, the turn tokens at Gemma's ids,
# the image run's tokens at the top); 8 layers, [sliding × 3, full] × 2 with a 24-key window (shorter than every prompt) and
# two different RoPE thetas; a 2-layer SigLIP at 128 px, patch 4 (32 × 32 patches) pooled 2 × 2 into 256 tokens
# (like the released checkpoints' 256).
TINY_IDS = {"image_token_index": 299, "boi_token_index": 297, "eoi_token_index": 298}

_TINY_GEMMA3_CONFIG: dict[str, Any] = {
    "architectures": ["Gemma3ForConditionalGeneration"],
    "model_type": "gemma3",
    **TINY_IDS,
    "mm_tokens_per_image": 256,
    "tie_word_embeddings": True,
    "text_config": {
        "model_type": "gemma3_text",
        "vocab_size": 300,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 8,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "sliding_window": 24,
        "layer_types": (["sliding_attention"] * 3 + ["full_attention"]) * 2,
        "max_position_embeddings": 1024,
        "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0,
        "pad_token_id": 0,
        "bos_token_id": 2,
        "eos_token_id": 3,
    },
    "vision_config": {
        "model_type": "siglip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 128,
        "patch_size": 4,
        "vision_use_head": False,
    },
}

SPECS = (
    ModelSpec(
        alias="gemma-3-4b-it",
        hub_id="google/gemma-3-4b-it",
        config=_GEMMA3_4B_CONFIG,
        prompt_template=GEMMA3_PROMPT_TEMPLATE,
        description="Gemma 3 4B instruct (34 layers: 5 sliding-window : 1 global; SigLIP 896 px pooled to 256 visual tokens)",
    ),
    ModelSpec(
        alias="gemma-3-12b-it",
        hub_id="google/gemma-3-12b-it",
        config=_GEMMA3_12B_CONFIG,
        prompt_template=GEMMA3_PROMPT_TEMPLATE,
        description="Gemma 3 12B instruct (48 layers: 5 sliding-window : 1 global; SigLIP 896 px pooled to 256 visual tokens)",
    ),
    ModelSpec(
        alias="tiny-gemma3",
        hub_id=None,
        config=_TINY_GEMMA3_CONFIG,
        prompt_template=GEMMA3_PROMPT_TEMPLATE,
        description="built-in tiny random Gemma 3 (SigLIP 2x32 @128px patch 4 pooled to 256 tokens, LM 8x64 sliding-window / global)",
    ),
)


def _turn_tokens(config: Any) -> dict[str, int]:
    """Gemma's turn-token ids where the vocabulary has them free, else the highest free ids."""
    vocab = int(config.text_config.vocab_size)
    taken = {image_token_id(config), int(config.boi_token_index), int(config.eoi_token_index), pad_token_id(config)}
    if vocab > max(TURN_TOKENS.values()) and not taken & set(TURN_TOKENS.values()):
        return dict(TURN_TOKENS)
    free = [i for i in range(vocab - 1, -1, -1) if i not in taken]
    return dict(zip(TURN_TOKENS, free))


def gemma3_tokenizer(config: Any) -> Any:
    """The built-in tokenizer with Gemma 3's image-run and turn tokens at the config's ids."""
    text = config.text_config
    tokenizer = builtin_tokenizer(
        vocab_size=int(text.vocab_size),
        image_token_id=image_token_id(config),
        pad_token_id=pad_token_id(config),
        image_token=IMAGE_SOFT_TOKEN,
        special_tokens={BOI_TOKEN: int(config.boi_token_index), EOI_TOKEN: int(config.eoi_token_index), **_turn_tokens(config)},
        named_tokens={"boi_token": BOI_TOKEN, "eoi_token": EOI_TOKEN},
    )
    tokenizer.model_max_length = int(getattr(text, "max_position_embeddings", 131072))
    return tokenizer


def _per_prompt(images: Any, text: Any, marker: str) -> Any:
    """A flat list of images regrouped as ``Gemma3Processor`` wants them: one list per prompt, as many
    images as the prompt has ``marker`` s (unchanged when it is already nested or the counts differ)."""
    if not isinstance(images, (list, tuple)) or not isinstance(text, (list, tuple)) or len(text) < 2:
        return images
    if any(isinstance(image, (list, tuple)) for image in images):
        return images
    counts = [str(t).count(marker) for t in text]
    if sum(counts) != len(images):
        return images
    grouped, start = [], 0
    for count in counts:
        grouped.append(list(images[start:start + count]))
        start += count
    return grouped


def _builtin_processor_class() -> type:
    from transformers import Gemma3Processor

    class BuiltinGemma3Processor(Gemma3Processor):
        """``Gemma3Processor`` that also takes a batch's images as one flat list, in prompt order
        (what every other family's processor takes): they are regrouped per prompt."""

        def __call__(self, images: Any = None, text: Any = None, **kwargs: Any) -> Any:
            return super().__call__(images=_per_prompt(images, text, self.boi_token), text=text, **kwargs)

    return BuiltinGemma3Processor


@register_family("gemma3")
class Gemma3CompilerFamily(CompilerFamily):
    """Gemma 3: ``Gemma3Processor`` (one square crop per image), SigLIP pooled into ``mm_tokens_per_image`` tokens."""

    specs = SPECS
    prompt_template = GEMMA3_PROMPT_TEMPLATE

    def processor(self, config: Any) -> Any:
        """``Gemma3Processor`` with the built-in tokenizer, the PIL image backend (no torchvision) and pan-and-scan off;
        a batch's images may be given as one flat list, in prompt order."""
        from transformers import Gemma3ImageProcessorPil

        size = int(config.vision_config.image_size)
        image_processor = Gemma3ImageProcessorPil(
            size={"height": size, "width": size}, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
            do_pan_and_scan=False,
        )
        return _builtin_processor_class()(image_processor=image_processor, tokenizer=gemma3_tokenizer(config),
                                          image_seq_length=int(config.mm_tokens_per_image))

    def batch_images(self, images: list, texts: list) -> list:
        """One list of images per prompt (``Gemma3Processor`` reads a flat list as one prompt's images)."""
        return _per_prompt(list(images), list(texts), BOI_TOKEN)

    def vision_shape(self, config: Any) -> VisionShape:
        """SigLIP on every patch of the square input (no CLS), then one ``vision → text`` matrix on the pooled tokens."""
        vision = config.vision_config
        patch = int(vision.patch_size)
        width = int(vision.hidden_size)
        patches = (int(vision.image_size) // patch) ** 2
        return VisionShape(
            "crops", int(vision.num_hidden_layers), width, int(vision.intermediate_size), False,
            int(getattr(vision, "num_channels", 3)) * patch * patch, ((width, int(config.text_config.hidden_size)),),
            tokens_per_crop=patches, projected_per_crop=int(config.mm_tokens_per_image), cls_tokens=0,
        )

    def vision_flops_per_row(self, model: Any, inputs: dict, shape: VisionShape, image_token_id: int) -> np.ndarray:
        """One crop per image, ``mm_tokens_per_image`` placeholders each."""
        return one_crop_per_image_flops(inputs, shape, image_token_id)

    def picture_views(self, model: Any, inputs: dict, positions: np.ndarray) -> list[PictureView]:
        """One view: the square input image under its ``side × side`` grid of pooled tokens."""
        return square_picture_view(positions, "Gemma 3")

    def resize_language_model(self, config: dict, text: dict) -> dict:
        """A copy with the language model resized; heads of ``hidden / heads`` and the query scale following them."""
        config = copy.deepcopy(config)
        config["text_config"].update(text)
        heads = int(config["text_config"].get("num_attention_heads", 8))
        config["text_config"]["head_dim"] = int(text["hidden_size"]) // heads
        config["text_config"]["query_pre_attn_scalar"] = int(text["hidden_size"]) // heads
        config["text_config"].pop("layer_types", None)  # recomputed from the layer count (5 sliding : 1 global)
        return config

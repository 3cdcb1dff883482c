"""Qwen3-VL in the compiler: embedded configs, ``tiny-qwen3-vl``, chat prompt, processor, vision FLOPs with deepstack.

Sources of the embedded configs: the hub ``config.json`` files of ``Qwen/Qwen3-VL-2B-Instruct``,
``Qwen/Qwen3-VL-4B-Instruct`` and ``Qwen/Qwen3-VL-8B-Instruct`` (the nested ``text_config`` /
``vision_config`` layout of transformers 4.57): Qwen3-1.7B / 4B / 8B decoders (head_dim 128, q/k
RMS norms, interleaved M-RoPE ``[24, 20, 20]``, theta 5e6) and a SigLIP-2 ViT at 16-px patches with
learned position embeddings (a 48 × 48 grid, interpolated per image) and three deepstack mergers
(``deepstack_visual_indexes``).

The chat prompt is what the checkpoints' chat template renders for one image and one question:
unlike Qwen2-VL's it has no default system message. The offline processor is Qwen2-VL's
(:mod:`.qwen2_vl`, the built-in tokenizer at Qwen's ids) with ``Qwen3VLProcessor`` and the released
``preprocessor_config.json``'s image settings: mean and std 0.5, 65,536 to 16,777,216 pixels
(``shortest_edge`` / ``longest_edge``), unless the vision config carries ``min_pixels`` /
``max_pixels`` (the built-in tiny model does).

Vision FLOPs: a ViT over each frame (no windows, fc1/fc2 MLP), then the merger and every deepstack
merger, each a ``merge²·w → merge²·w → out`` MLP per merged token.

Example:
    >>> from recipe_compiler.models import load_model
    >>> load_model("tiny-qwen3-vl").model.config.model_type
    'qwen3_vl'
"""
from __future__ import annotations

from typing import Any

from ..flops import VisionShape
from .base import ModelSpec, register_family
from .qwen2_vl import QWEN_IDS, TINY_IDS, TINY_PIXELS, TINY_TEXT, Qwen2VLCompilerFamily

QWEN3_VL_PROMPT_TEMPLATE = (
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{prompt}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
"""Qwen3-VL single-turn prompt: its chat template's rendering of one image and one question (no
default system message). The processor expands ``<|image_pad|>`` to the image's token count."""

# Released checkpoints' preprocessor_config.json.
MIN_PIXELS = 65536
MAX_PIXELS = 16777216
IMAGE_MEAN = [0.5, 0.5, 0.5]
IMAGE_STD = [0.5, 0.5, 0.5]


def _qwen3_vl_config(text: dict, vision: dict, tie: bool) -> dict:
    """The config.json layout of Qwen/Qwen3-VL-{2B,4B,8B}-Instruct."""
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "model_type": "qwen3_vl",
        **{k: v for k, v in QWEN_IDS.items() if k != "vision_token_id"},
        "text_config": {
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": 151643,
            "dtype": "bfloat16",
            "eos_token_id": 151645,
            "head_dim": 128,
            "hidden_act": "silu",
            **text,
            "initializer_range": 0.02,
            "max_position_embeddings": 262144,
            "model_type": "qwen3_vl_text",
            "num_key_value_heads": 8,
            "rms_norm_eps": 1e-06,
            "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
            "rope_theta": 5000000,
            "tie_word_embeddings": tie,
            "use_cache": True,
            "vocab_size": 151936,
        },
        "tie_word_embeddings": tie,
        "transformers_version": "4.57.0.dev0",
        "vision_config": {
            "hidden_act": "gelu_pytorch_tanh",
            **vision,
            "in_channels": 3,
            "initializer_range": 0.02,
            "model_type": "qwen3_vl",
            "num_heads": 16,
            "num_position_embeddings": 2304,
            "out_hidden_size": text["hidden_size"],
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
    }


def _text(hidden: int, intermediate: int, heads: int, layers: int) -> dict:
    return {"hidden_size": hidden, "intermediate_size": intermediate, "num_attention_heads": heads, "num_hidden_layers": layers}


_SIGLIP2_LARGE = {"depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "deepstack_visual_indexes": [5, 11, 17]}
_SIGLIP2_SO400M = {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "deepstack_visual_indexes": [8, 16, 24]}

_QWEN3_VL_2B_CONFIG = _qwen3_vl_config(_text(2048, 6144, 16, 28), _SIGLIP2_LARGE, tie=True)
_QWEN3_VL_4B_CONFIG = _qwen3_vl_config(_text(2560, 9728, 32, 36), _SIGLIP2_LARGE, tie=True)
_QWEN3_VL_8B_CONFIG = _qwen3_vl_config(_text(4096, 12288, 32, 36), _SIGLIP2_SO400M, tie=False)

# tiny-qwen3-vl: tiny-qwen2-vl's tokenizer and ids; a 4-block ViT whose blocks 0, 1, 2 feed
# deepstack mergers (added after LM layers 0, 1, 2, as the real three), a 16 × 16 learned
# position grid, and a Qwen3 decoder whose head_dim (24) is not hidden / heads, as in the 4B.
_TINY_QWEN3_VL_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen3VLForConditionalGeneration"],
    "model_type": "qwen3_vl",
    **{k: v for k, v in TINY_IDS.items()},
    "tie_word_embeddings": False,
    "vision_config": {
        "depth": 4,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "in_channels": 3,
        "out_hidden_size": 64,
        "patch_size": 4,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "num_position_embeddings": 256,
        "deepstack_visual_indexes": [0, 1, 2],
        "hidden_act": "gelu_pytorch_tanh",
        **TINY_PIXELS,
    },
    "text_config": {
        **{k: v for k, v in TINY_TEXT.items() if k != "rope_scaling"},
        "head_dim": 24,
        "rope_theta": 5000000.0,
        "rope_scaling": {"mrope_interleaved": True, "mrope_section": [4, 4, 4], "rope_type": "default"},  # 12 rotary pairs
    },
}


SPECS = (
    ModelSpec(
        alias="qwen3-vl-2b",
        hub_id="Qwen/Qwen3-VL-2B-Instruct",
        config=_QWEN3_VL_2B_CONFIG,
        prompt_template=QWEN3_VL_PROMPT_TEMPLATE,
        description="Qwen3-VL 2B Instruct (Qwen3-1.7B + SigLIP-2 ViT with deepstack, 256 visual tokens at 512 px)",
    ),
    ModelSpec(
        alias="qwen3-vl-4b",
        hub_id="Qwen/Qwen3-VL-4B-Instruct",
        config=_QWEN3_VL_4B_CONFIG,
        prompt_template=QWEN3_VL_PROMPT_TEMPLATE,
        description="Qwen3-VL 4B Instruct (Qwen3-4B + SigLIP-2 ViT with deepstack, 256 visual tokens at 512 px)",
    ),
    ModelSpec(
        alias="qwen3-vl-8b",
        hub_id="Qwen/Qwen3-VL-8B-Instruct",
        config=_QWEN3_VL_8B_CONFIG,
        prompt_template=QWEN3_VL_PROMPT_TEMPLATE,
        description="Qwen3-VL 8B Instruct (Qwen3-8B + SigLIP-2 so400m ViT with deepstack, 256 visual tokens at 512 px)",
    ),
    ModelSpec(
        alias="tiny-qwen3-vl",
        hub_id=None,
        config=_TINY_QWEN3_VL_CONFIG,
        prompt_template=QWEN3_VL_PROMPT_TEMPLATE,
        description="built-in tiny random Qwen3-VL (ViT 4x32 patch 4 with 3 deepstack mergers, LM 8x64 GQA 4/2, M-RoPE, up to 256 visual tokens)",
    ),
)


@register_family("qwen3_vl")
class Qwen3VLCompilerFamily(Qwen2VLCompilerFamily):
    """Qwen3-VL: Qwen2-VL's processor with Qwen3-VL's image settings; a ViT with deepstack mergers."""

    specs = SPECS
    prompt_template = QWEN3_VL_PROMPT_TEMPLATE
    processor_class = "Qwen3VLProcessor"

    def processor(self, config: Any) -> Any:
        """Qwen2-VL's offline processor, its image processor set as Qwen3-VL's ``preprocessor_config.json``."""
        from transformers import Qwen2VLImageProcessorPil

        processor = super().processor(config)
        vision = config.vision_config
        processor.image_processor = Qwen2VLImageProcessorPil(
            patch_size=int(vision.patch_size),
            temporal_patch_size=int(vision.temporal_patch_size),
            merge_size=int(vision.spatial_merge_size),
            min_pixels=int(getattr(vision, "min_pixels", MIN_PIXELS)),
            max_pixels=int(getattr(vision, "max_pixels", MAX_PIXELS)),
            image_mean=list(IMAGE_MEAN),
            image_std=list(IMAGE_STD),
        )
        return processor

    def vision_shape(self, config: Any) -> VisionShape:
        """A ViT over each frame (fc1/fc2 MLP); the merger and each deepstack merger map every ``merge²``
        patches to one token through ``merge²·w → merge²·w → out``."""
        vision = config.vision_config
        merge = int(vision.spatial_merge_size)
        width = int(vision.hidden_size)
        merged = width * merge * merge
        merger = ((merged, merged), (merged, int(vision.out_hidden_size)))
        mergers = 1 + len(getattr(vision, "deepstack_visual_indexes", None) or ())
        return VisionShape(
            "grids", int(vision.depth), width, int(vision.intermediate_size), False, self._patch_inputs(vision),
            merger * mergers, merge=merge,
        )

    def resize_language_model(self, config: dict, text: dict) -> dict:
        """Qwen2-VL's resizing (GQA, the mergers into the new width) with head_dim following the width
        and M-RoPE's interleaved sections scaled to it."""
        heads = text.get("num_attention_heads", config["text_config"].get("num_attention_heads"))
        config = super().resize_language_model(config, text)
        pairs = text["hidden_size"] // heads // 2
        config["text_config"]["head_dim"] = 2 * pairs
        rope = config["text_config"]["rope_scaling"]
        rope["mrope_section"] = [pairs - 2 * (5 * pairs // 16), 5 * pairs // 16, 5 * pairs // 16]  # as 64 → [24, 20, 20]
        return config

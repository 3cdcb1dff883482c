"""Model-family adapters: where a vision-language model keeps the parts the pruner hooks.

A registry keyed by ``config.model_type``, so new families plug in without touching the pruner.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Callable

import torch

_ADAPTERS: dict[str, "FamilyAdapter"] = {}


def register_adapter(*model_types: str) -> Callable[[type], type]:
    """Class decorator: register a :class:`FamilyAdapter` subclass for the given model types.

    Example:
        >>> @register_adapter("my_vlm")
        ... class MyAdapter(LlavaAdapter): ...
    """

    def wrap(cls: type) -> type:
        for model_type in model_types:
            _ADAPTERS[model_type] = cls()
        return cls

    return wrap


def supported_model_types() -> list[str]:
    return sorted(_ADAPTERS)


def adapter_for(model: torch.nn.Module) -> "FamilyAdapter":
    """Return the adapter for ``model`` (a VLM or its base model).

    Raises:
        TypeError: the model family has no adapter; the message lists the supported ones.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _ADAPTERS:
        raise TypeError(
            f"model type {model_type!r} is not supported by the pruning runtime; "
            f"supported: {', '.join(supported_model_types())}"
        )
    return _ADAPTERS[model_type]


class FamilyAdapter:
    """How to find the language model, its layers and the visual tokens of one model family."""

    text_fields = (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "vocab_size", "hidden_act", "rms_norm_eps",
        "rope_theta", "tie_word_embeddings",
    )
    vision_fields = (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "image_size", "patch_size", "hidden_act",
    )
    top_fields = (
        "image_token_index", "image_token_id", "vision_feature_layer",
        "vision_feature_select_strategy", "projector_hidden_act", "multimodal_projector_bias",
    )

    def base_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module whose forward merges image features into the token embeddings.

        ``XForConditionalGeneration.model`` in transformers 5.x; the base model itself if given.
        """
        return model if hasattr(model, "language_model") else model.model

    def language_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.base_model(model).language_model

    def layers(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        return self.language_model(model).layers

    def text_config(self, model: torch.nn.Module) -> Any:
        return self.language_model(model).config

    def image_token_id(self, model: torch.nn.Module) -> int:
        config = model.config
        return int(getattr(config, "image_token_id", None) or config.image_token_index)

    def reference_visual_tokens(self, config: Any) -> int:
        """Visual tokens of the family's reference image: the unit of a recipe's ``keep_count``."""
        raise NotImplementedError

    def prunable_visual_tokens(self, model: torch.nn.Module, input_ids: torch.Tensor, base_kwargs: dict) -> torch.Tensor:
        """(B, L) bool: the positions a recipe may drop, at prefill.

        Args:
            model: the VLM the hooks are on.
            input_ids: (B, L) prompt ids as the base model received them.
            base_kwargs: the other keyword arguments of the base model's forward (e.g. ``image_sizes``).

        The default is every image placeholder token; families override it to protect tokens
        that carry layout (LLaVA-NeXT's row-end newlines) or to add video tokens.
        """
        return input_ids == self.image_token_id(model)

    def fingerprint(self, model: torch.nn.Module) -> dict:
        """Architecture facts a recipe depends on, plus a hash of the architecture-relevant config.

        Dtype, attention implementation, device and weights are deliberately not part of it: a
        recipe compiled on random weights in fp32 applies to the real checkpoint in bf16.
        """
        text = self.text_config(model)
        relevant = {
            "model_type": model.config.model_type,
            "text": {f: _jsonable(getattr(text, f, None)) for f in self.text_fields},
            "vision": {f: _jsonable(getattr(model.config.vision_config, f, None)) for f in self.vision_fields},
            "top": {f: _jsonable(getattr(model.config, f, None)) for f in self.top_fields},
        }
        digest = hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]
        return {
            "model_type": model.config.model_type,
            "num_layers": int(text.num_hidden_layers),
            "hidden_size": int(text.hidden_size),
            "num_heads": int(text.num_attention_heads),
            "num_kv_heads": int(getattr(text, "num_key_value_heads", None) or text.num_attention_heads),
            "visual_tokens": int(self.reference_visual_tokens(model.config)),
            "config_hash": digest,
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in sorted(value.items())}
    return str(value)


@register_adapter("llava")
class LlavaAdapter(FamilyAdapter):
    """LLaVA-1.5 (``LlavaForConditionalGeneration``): one contiguous run of image tokens per image."""

    def reference_visual_tokens(self, config: Any) -> int:
        vision = config.vision_config
        patches = (int(vision.image_size) // int(vision.patch_size)) ** 2
        strategy = getattr(config, "vision_feature_select_strategy", "default")
        return patches + (1 if strategy == "full" else 0)


def model_fingerprint(model: torch.nn.Module) -> dict:
    """The fingerprint a recipe for ``model`` must carry (see :meth:`FamilyAdapter.fingerprint`)."""
    return adapter_for(model).fingerprint(model)


from . import adapters_llava_next  # noqa: E402,F401  (registers llava_next)
from . import adapters_qwen2_vl  # noqa: E402,F401  (registers qwen2_vl, qwen2_5_vl)

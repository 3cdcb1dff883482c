"""What the runtime knows about a model family, and the registry of families (keyed by ``model_type``).

A family is one module of :mod:`runtime.families` with a :class:`Family` subclass registered by
:func:`register_family`; it says where the language model, its decoder layers, the vision tower
and the image tokens are, which placeholders a recipe may drop, the model facts a recipe is
compiled for (the fingerprint) and the family's reference image, and, for pre-LLM stages, the
vision signals its encoder can give (and why not the others), how to capture them and how an
image's tokens split into *views* (patch grids ranked together). Nothing outside the family
modules looks at ``model_type``. This module defines the kind and starts its registry empty; the
package imports the families, one line each.

Example:
    >>> from runtime.families import family_for
    >>> family_for(tiny.model).reference_visual_tokens(tiny.model.config)   # doctest: +SKIP
    576
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..errors import UnsupportedModelError
from ..registry import Registry

FAMILIES = Registry("model family")
"""``model_type`` → :class:`Family`; filled by the family modules."""


def register_family(*model_types: str) -> Callable[[type], type]:
    """Class decorator: register one instance of a :class:`Family` subclass for ``model_types``.

    Example:
        >>> @register_family("my_vlm")               # doctest: +SKIP
        ... class MyFamily(Family): ...
    """

    def wrap(cls: type) -> type:
        cls.model_types = tuple(model_types)
        family = cls()
        for model_type in model_types:
            FAMILIES.register(model_type, family)
        return cls

    return wrap


def supported_model_types() -> list[str]:
    """Every ``model_type`` the runtime can prune, sorted."""
    return sorted(FAMILIES)


def family_for(model: Any) -> "Family":
    """The family of ``model`` (a VLM or its base model).

    Raises:
        UnsupportedModelError: the model type has no family; the message lists the supported ones.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported by the pruning runtime; "
            f"supported: {', '.join(supported_model_types())}"
        )
    return FAMILIES[model_type]


def model_fingerprint(model: Any) -> dict:
    """The fingerprint a recipe for ``model`` must carry (see :meth:`Family.fingerprint`)."""
    return family_for(model).fingerprint(model)


@dataclass
class View:
    """One ranked unit of a pre-LLM stage: prompt ``positions`` (row ``row``) of its prunable tokens
    in grid order, the grid's ``(rows, cols)`` when known, and the vision signals of its tokens."""

    row: int
    positions: torch.Tensor
    grid: tuple[int, int] | None
    attention: torch.Tensor | None = None  # (n,) patch significance from the encoder's attention
    clssim: torch.Tensor | None = None  # (n,) cosine of each patch to the CLS token


@dataclass
class Encoded:
    """One ``get_image_features`` call: the per-image feature blocks it returned, with its signals.

    ``blocks`` are what the model scatters into the image placeholders, image by image; the
    signals were captured from the vision encoder during the same call, indexed as the family's
    encoder produced them; ``layout`` is what the call's arguments said about each image
    (:meth:`Family.image_layout`).
    """

    blocks: list
    attention: torch.Tensor | None = None
    features: torch.Tensor | None = None
    layout: list | None = None


Signal = Callable[[str], "torch.Tensor | None"]
"""``signal(name)``: a captured vision signal of one encoding, ``None`` when the stage did not ask for it."""


class Family:
    """How to find the language model, its layers and the visual tokens of one model family.

    Subclasses set the fingerprint fields and implement :meth:`reference_visual_tokens`; families
    that run pre-LLM stages set ``pre_llm = True``, :attr:`signals`, and implement
    :meth:`vision_layers`, :meth:`signal_hooks` and :meth:`views`.
    """

    model_types: tuple[str, ...] = ()
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
    layer_kinds: tuple[str, ...] = ("full_attention",)
    """Decoder layer kinds (``text_config.layer_types``) the pruner handles for this family."""
    layer_kinds_hint = ""
    """Appended to the refusal of other layer kinds (e.g. the config switch that made them)."""
    bidirectional_visual = False
    """Whether the tokens of one image attend to each other both ways at prefill (Gemma 3), which
    the FLOPs model counts."""

    pre_llm = False
    """Whether the family can run pre-LLM stages at all (it has views and a vision encoder hook)."""
    vllm_architecture: str | None = None
    """The model class :mod:`runtime.vllm_models` defines to serve this family's pre-LLM stage in vLLM."""
    vllm_refusal = "the vLLM plugin has no model class for this family"
    """Why the family is not served in vLLM (when :attr:`vllm_architecture` is None)."""
    signals: dict[str, str | None] = {}
    """Vision signals pre-LLM stages may read: name → ``None`` (the family provides it) or why not.

    ``"attention"``: each patch's significance from the encoder's attention at a feature layer;
    ``"features"``: the CLS and patch hidden states of the model's feature layer;
    ``"encoder_patches"``: each language-model image token is one encoder patch and the projector
    maps encoder features to token embeddings one to one, so a stage may read the encoder's own
    layers per patch and write merged encoder features through the projector (VisionZip).
    """

    # ------------------------------------------------------------------ where things are
    def base_model(self, model: Any) -> Any:
        """The module whose forward merges image features into the token embeddings.

        ``XForConditionalGeneration.model`` in transformers 5.x; the base model itself if given.
        """
        return model if hasattr(model, "language_model") else model.model

    def language_model(self, model: Any) -> Any:
        return self.base_model(model).language_model

    def text_config(self, model: Any) -> Any:
        return self.language_model(model).config

    def flops_shape(self, model: Any) -> Any:
        """The language model's :class:`runtime.flops.LMShape`, with what the family says about image attention."""
        from ..flops import LMShape

        return LMShape.from_config(self.text_config(model), bidirectional_visual=self.bidirectional_visual)

    def layers(self, model: Any) -> torch.nn.ModuleList:
        """The decoder layers the pruner hooks.

        Raises:
            UnsupportedModelError: the model has decoder layers of a kind the pruner cannot prune.
        """
        self.check(model)
        return self.language_model(model).layers

    def image_token_id(self, model: Any) -> int:
        config = model.config
        return int(getattr(config, "image_token_id", None) or config.image_token_index)

    # ------------------------------------------------------------------ what the pruner can handle
    def unsupported_reason(self, model: Any) -> str | None:
        """Why the pruner cannot run on this model of the family (``None``: it can).

        Layers of different kinds (sliding/global attention, linear/full attention) need masks,
        positions and caches per kind, which the pruner does not build: such models are refused.
        """
        kinds = tuple(getattr(self.text_config(model), "layer_types", None) or ())
        other = sorted(set(kinds) - set(self.layer_kinds))
        if not other:
            return None
        hint = f" ({self.layer_kinds_hint})" if self.layer_kinds_hint else ""
        return (
            f"this {model.config.model_type!r} model has {', '.join(other)} decoder layers{hint}, which the pruning "
            f"runtime does not support: it prunes models whose layers are all {', '.join(self.layer_kinds)}"
        )

    def check(self, model: Any) -> None:
        """Raise :class:`UnsupportedModelError` when :meth:`unsupported_reason` gives one."""
        reason = self.unsupported_reason(model)
        if reason is not None:
            raise UnsupportedModelError(reason)

    def layer_kinds_of(self, model: Any) -> tuple[str, ...]:
        """Each decoder layer's kind (``text_config.layer_types``; all ``"full_attention"`` without one)."""
        text = self.text_config(model)
        kinds = tuple(getattr(text, "layer_types", None) or ())
        return kinds or ("full_attention",) * int(text.num_hidden_layers)

    def attention_layers(self, model: Any) -> tuple[int, ...]:
        """The decoder layers with attention rows a probe can read (default: every layer).

        A scoring cut on entry to layer ``l`` reads layer ``l − 1``; families with attention-free
        layers (Qwen3.5's linear attention) narrow this, and the pruner refuses a recipe that
        would probe elsewhere.
        """
        return tuple(range(int(self.text_config(model).num_hidden_layers)))

    def cut_layers(self, model: Any) -> tuple[int, ...]:
        """The layers ``l >= 1`` on whose entry a scoring recipe may prune: those after an attention layer."""
        return tuple(layer + 1 for layer in self.attention_layers(model) if layer + 1 < int(self.text_config(model).num_hidden_layers))

    def attention_module(self, model: Any, index: int) -> Any:
        """The softmax-attention module of decoder layer ``index`` a probe can read, or ``None``
        (e.g. a linear-attention layer): the pruner refuses a probe there."""
        return getattr(self.layers(model)[index], "self_attn", None)

    def padding_mask(self, lm_mask: Any, base_kwargs: dict) -> Any:
        """The 2D padding mask of a forward, given the mask the language model received.

        Families whose base model pre-builds a dict of per-kind masks (Gemma 3) pass it down to
        the language model; the 2D mask is then the base model's own ``attention_mask``.
        """
        return base_kwargs.get("attention_mask") if isinstance(lm_mask, dict) else lm_mask

    def layer_mask(self, model: Any, kind: str, config: Any, hidden: torch.Tensor, mask2d: torch.Tensor, cache: Any,
                   layer: int, prompt_index: torch.Tensor, prefill: bool, base_kwargs: dict) -> Any:
        """The attention mask of the layers of ``kind`` from ``layer`` on, over a pruned sequence.

        Args:
            model: the VLM.
            kind: a layer kind (:meth:`layer_kinds_of`).
            config: the language model's config (its attention implementation is the wrapped one).
            hidden: (B, q, D) hidden states of this forward entering ``layer``.
            mask2d: (B, kv) bool padding mask over the pruned prompt and every token after it.
            cache: the forward's cache (or ``None``); ``layer`` sizes the mask against its own layer.
            layer: the first layer of ``kind`` at or after the pruning layer.
            prompt_index: (B, L') prompt position of each slot of the pruned prompt (prefill overlays
                such as Gemma 3's bidirectional image blocks gather by it).
            prefill: whether this forward is the prefill.
            base_kwargs: the base model's keyword arguments of this forward (e.g. ``token_type_ids``).

        The default is a causal mask for ``full_attention``, a sliding-window causal one for
        ``sliding_attention`` (the window counted in slots of the pruned sequence, as when the
        model runs on the pruned prompt), and for ``linear_attention`` the 2D padding mask of this
        forward's tokens (``create_recurrent_attention_mask``: ``None`` without padding and for
        one-token steps), by which the layer zeroes re-padding dummies.
        """
        from transformers.masking_utils import (
            create_causal_mask,
            create_recurrent_attention_mask,
            create_sliding_window_causal_mask,
        )

        if kind == "linear_attention":
            return create_recurrent_attention_mask(config, hidden, mask2d.long(), cache)
        build = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
        # The cache goes by position: transformers 5.24 renamed the parameter past_key_values -> cache.
        return build(config, hidden, mask2d, cache, position_ids=None, layer_idx=layer)

    def pruning_hooks(self, model: Any, pruned: Callable[[], "tuple[torch.Tensor, torch.Tensor] | None"]) -> list:
        """Hooks the family needs beside the pruner's own while a recipe prunes ``model``.

        For models whose forward indexes token positions outside the decoder layers (Qwen3-VL's
        deepstack); the default installs none.

        Args:
            model: the VLM the pruner is on.
            pruned: ``pruned()`` gives the current prefill's sequence once a layer has pruned it,
                ``(prompt index, valid)``, both (B, L'); ``None`` otherwise (nothing pruned yet,
                a decode step, a request passing through).

        Returns:
            Removable handles (removed with the recipe's handle).
        """
        return []

    # ------------------------------------------------------------------ visual tokens
    def reference_visual_tokens(self, config: Any) -> int:
        """Visual tokens of the family's reference image: the unit of a recipe's ``keep_count``."""
        raise NotImplementedError

    def prunable_visual_tokens(self, model: Any, input_ids: torch.Tensor, base_kwargs: dict) -> torch.Tensor:
        """(B, L) bool: the positions a recipe may drop, at prefill.

        Args:
            model: the VLM the hooks are on.
            input_ids: (B, L) prompt ids as the base model received them.
            base_kwargs: the other keyword arguments of the base model's forward (e.g. ``image_sizes``).

        The default is every image placeholder token; families override it to protect tokens
        that carry layout (LLaVA-NeXT's row-end newlines) or to leave out video tokens.
        """
        return input_ids == self.image_token_id(model)

    def fingerprint(self, model: Any) -> dict:
        """Architecture facts a recipe depends on, plus a hash of the architecture-relevant config.

        Dtype, attention implementation, device and weights are deliberately not part of it: a
        recipe compiled on random weights in fp32 applies to the real checkpoint in bf16.
        """
        text = self.text_config(model)
        relevant = {
            "model_type": model.config.model_type,
            "text": {f: jsonable(getattr(text, f, None)) for f in self.text_fields},
            "vision": {f: jsonable(getattr(model.config.vision_config, f, None)) for f in self.vision_fields},
            "top": {f: jsonable(getattr(model.config, f, None)) for f in self.top_fields},
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

    # ------------------------------------------------------------------ pre-LLM stages
    def vision_layers(self, model: Any) -> torch.nn.ModuleList:
        """The vision encoder's layers."""
        raise ValueError(f"pre-LLM stages are not implemented for model type {model.config.model_type!r}")

    def default_feature_layer(self, model: Any) -> Any:
        """The vision layer the model's image features come from (HF ``vision_feature_layer`` convention)."""
        return getattr(model.config, "vision_feature_layer", -1)

    def resolve_feature_layer(self, model: Any, index: int | None = None, name: str = "feature layer") -> int:
        """A vision feature layer as a non-negative ``hidden_states`` index in ``[1, depth]``.

        Same convention as HF ``vision_feature_layer``: ``hidden_states[0]`` is the embeddings,
        ``i >= 1`` the output of encoder layer ``i``, negative counts from the end (``-1`` = last).

        Args:
            model: a VLM of this family.
            index: the layer; ``None`` means the model's own (:meth:`default_feature_layer`).
            name: what to call the value in the error (e.g. the CLI option).

        Returns:
            ``hidden_states`` index; the attention read is that of encoder layer ``index − 1`` (0-based).

        Raises:
            ValueError: not an integer, or out of range for the encoder's depth (names both).

        Example:
            >>> family_for(tiny.model).resolve_feature_layer(tiny.model, -2)   # doctest: +SKIP
            1
        """
        if index is None:
            index = self.default_feature_layer(model)
            if not isinstance(index, int):
                raise ValueError(f"vision_feature_layer {index!r} is not a single layer; pre-LLM stages need one")
        if isinstance(index, bool) or not isinstance(index, int):
            raise ValueError(f"{name} {index!r} must be an integer (HF vision_feature_layer convention)")
        depth = len(self.vision_layers(model))
        hidden = index if index >= 0 else depth + 1 + index
        if not 1 <= hidden <= depth:
            raise ValueError(f"{name} {index} is out of range for this {depth}-layer vision encoder; use 1..{depth} or -{depth}..-1")
        return hidden

    def feature_encoder_layer(self, model: Any, index: int | None = None) -> int:
        """0-based index of the encoder layer whose output is feature layer ``index`` (default: the model's)."""
        return self.resolve_feature_layer(model, index) - 1

    def stage_precondition(self, model: Any) -> str | None:
        """Why this model of the family cannot run any pre-LLM stage (``None``: it can)."""
        try:
            self.resolve_feature_layer(model)
        except (ValueError, AttributeError) as exc:
            return str(exc)
        return None

    def signal_hooks(self, model: Any, capture: set, feature_layer: int | None, record: Callable[[str, torch.Tensor], None]) -> list:
        """Install hooks on the vision encoder that ``record(signal, value)`` each vision forward's signals.

        Args:
            model: the VLM.
            capture: the signals wanted (a subset of the provided :attr:`signals`).
            feature_layer: the vision layer whose attention ``"attention"`` reads (default: the model's).
            record: called once per vision forward and signal.

        Returns:
            Removable hook handles.
        """
        return []

    def image_layout(self, arguments: dict) -> list | None:
        """What a ``get_image_features`` call's bound ``arguments`` say about each image (e.g. its size)."""
        return None

    def views(self, model: Any, roles: Any, row: int, positions: torch.Tensor, encoded: Encoded, index: int,
              signal: Signal) -> list[View]:
        """The views of one image of the prefill, with the captured signals of their tokens.

        Args:
            model: the VLM.
            roles: the prefill's unpruned :class:`runtime.pruner.Roles`.
            row: the batch row of the image.
            positions: prompt positions of the image's placeholders (prunable or not), in order.
            encoded: the encoding the image came from; ``index``: the image's index in it.
            signal: the encoding's captured signals by name.

        Raises:
            runtime.errors.StageCannotRun: the image or its signals cannot be mapped to the prompt.
        """
        raise NotImplementedError


def jsonable(value: Any) -> Any:
    """A config value as plain JSON (for fingerprint hashes)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in sorted(value.items())}
    return str(value)

"""What the compiler knows about a model family, and the registries of families and model aliases.

A family is one module of :mod:`recipe_compiler.families` with a :class:`CompilerFamily` subclass
registered by :func:`register_family` for its ``model_type`` (s): its registry aliases with their
embedded ``config.json`` (data, :class:`ModelSpec`), the offline processor (built-in tokenizer)
and the loader of a saved one, the prompt template, the vision encoder's FLOPs shape and what
each prompt's images cost, where a one-image prompt's tokens sit on its picture, and the same
architecture with another language-model size (benchmarks). What the *runtime* knows of the
family (layers, token roles, view geometry) is in :mod:`runtime.families`; the compiler reads the
geometry from there. This module defines the kinds and starts the registries empty; the package
imports the families, one line each.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np

from runtime.families import family_for
from runtime.registry import Registry

from ..errors import CompileError, ModelNotFoundError
from ..flops import LMShape, VisionShape, encoder_flops, reference_encoder_flops

FAMILIES = Registry("model family")
"""``model_type`` → :class:`CompilerFamily`; filled by the family modules."""

ALIASES = Registry("model alias")
"""alias (lower case) → :class:`ModelSpec`; filled by the family modules' ``specs``."""

# OpenAI CLIP normalisation, as in transformers.image_utils.OPENAI_CLIP_MEAN / _STD.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry.

    Attributes:
        alias: Short name used on the command line, e.g. ``"llava-1.5-7b"``.
        hub_id: Hub repository of the weights, e.g. ``"llava-hf/llava-1.5-7b-hf"``; ``None`` for
            built-in models.
        config: The full model config as a dict (the checkpoint's ``config.json``).
        prompt_template: Prompt format with one ``{prompt}`` placeholder.
        description: One-line human description.
        weights: For a built-in model with trained weights: the safetensors file, relative to the
            ``recipe_compiler`` package (e.g. ``"testbed/weights/model.safetensors"``); ``None``
            builds seeded random weights.
        tokenizer: For a built-in model with its own tokenizer: a factory returning it (the
            family's built-in tokenizer otherwise).
    """

    alias: str
    hub_id: str | None
    config: dict = field(hash=False, compare=True)
    prompt_template: str = ""
    description: str = ""
    weights: str | None = None
    tokenizer: Callable[[], Any] | None = field(default=None, hash=False, compare=False)


@dataclass(frozen=True)
class PictureView:
    """One grid of visual tokens over a one-image prompt's picture (for the kept-token pictures).

    Attributes:
        name: "" for single-view families, else the view's name ("base view", …).
        positions: int64 ``[rows, cols]``, the prompt position of each token.
        canvas: what the grid is spread evenly over: ``"input"`` (the processor's input image),
            ``"original"`` (the picture as given) or ``(width, height)`` (the picture resized so).
    """

    name: str
    positions: np.ndarray
    canvas: Any


def register_family(*model_types: str) -> Callable[[type], type]:
    """Class decorator: register one instance of a :class:`CompilerFamily` subclass for ``model_types``
    and its ``specs`` as registry aliases."""

    def wrap(cls: type) -> type:
        cls.model_types = tuple(model_types)
        family = cls()
        for model_type in model_types:
            FAMILIES.register(model_type, family)
        for spec in family.specs:
            ALIASES.register(spec.alias, spec)
        return cls

    return wrap


def family_of(config: Any) -> "CompilerFamily":
    """The compiler family of a model config (or of a model's ``config``).

    Raises:
        ModelNotFoundError: the model type has no family; the message lists the supported ones.
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ModelNotFoundError(f"model type {model_type!r} is not supported; supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]


def vision_shape(config: Any) -> VisionShape:
    """The vision encoder's FLOPs shape (:class:`~recipe_compiler.flops.VisionShape`) of a model config.

    Raises:
        ValueError: the model type has no family here, or the config has no vision encoder.

    Example:
        >>> vision_shape(config_from_dict(ALIASES["llava-1.5-7b"].config)).layers   # doctest: +SKIP
        24
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES or getattr(config, "vision_config", None) is None:
        raise ValueError(f"vision-encoder FLOPs are known for {', '.join(FAMILIES)} models, not {model_type!r}")
    return FAMILIES[model_type].vision_shape(config)


def lm_shape(model: Any) -> LMShape:
    """The FLOPs shape of a model's language model, with what its family says about image attention.

    Example:
        >>> lm_shape(load_model("tiny-llava").model).num_layers   # doctest: +SKIP
        8
    """
    return family_for(model).flops_shape(model)


def config_from_dict(config_dict: dict) -> Any:
    """The transformers config object of an embedded config dict (any registered family).

    Example:
        >>> config_from_dict(ALIASES["tiny-llava"].config).model_type   # doctest: +SKIP
        'llava'
    """
    from transformers import AutoConfig

    config = copy.deepcopy(config_dict)
    model_type = config.pop("model_type")
    if model_type not in FAMILIES:
        raise ModelNotFoundError(f"model type {model_type!r} is not supported; supported: {', '.join(sorted(FAMILIES))}")
    return AutoConfig.for_model(model_type, **config)


def registry_vision_flops(fingerprint: dict) -> tuple[str, float] | None:
    """The registry model a recipe's fingerprint names, and its encoder's FLOPs per reference image.

    ``recipe-inspect`` has no model, only the fingerprint; the registry's embedded configs are
    fingerprinted (no weights, no download) and the one matching every field is used.

    Args:
        fingerprint: a recipe's model fingerprint.

    Returns:
        ``(alias, vision encoder + projector FLOPs of the reference image)``, or None when no
        registry model matches (a hub id or local directory outside the registry).

    Example:
        >>> registry_vision_flops(load("r.safetensors").fingerprint)   # doctest: +SKIP
        ('tiny-llava', 112984320.0)
    """
    for alias, spec in ALIASES.items():
        try:
            config = config_from_dict(spec.config)
            text = getattr(config, "text_config", None) or config
            fake = SimpleNamespace(config=config, language_model=SimpleNamespace(config=text))  # all a fingerprint reads
            if family_for(fake).fingerprint(fake) != fingerprint:
                continue
            return alias, reference_encoder_flops(vision_shape(config), int(fingerprint["visual_tokens"]))
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
    return None


def image_token_id(config: Any) -> int:
    """The image placeholder's id in ``input_ids`` (``image_token_index`` in LLaVA configs, else ``image_token_id``)."""
    index = getattr(config, "image_token_index", None)
    return int(index if index is not None else config.image_token_id)


def pad_token_id(config: Any) -> int | None:
    """The config's padding id, when it is one and not the image placeholder."""
    for value in (getattr(config, "pad_token_id", None), getattr(config.text_config, "pad_token_id", None)):
        if isinstance(value, int) and value != image_token_id(config):
            return value
    return None


def one_crop_per_image_flops(inputs: dict, shape: VisionShape, image_token_id: int) -> np.ndarray:
    """float [B]: encoder + projector FLOPs of each prompt's images when each image is one crop of
    ``shape.projected_per_crop`` placeholders (LLaVA-1.5, Gemma 3)."""
    counts = (inputs["input_ids"] == image_token_id).sum(dim=1).tolist()
    return np.array([encoder_flops(shape, crops=n // shape.projected_per_crop) for n in counts])


def square_picture_view(positions: np.ndarray, family: str) -> list[PictureView]:
    """One view: the processor's square input image under a ``side × side`` grid of ``positions``.

    Raises:
        CompileError: the positions are not a square number (``family`` names the expected layout).
    """
    n = int(positions.size)
    side = math.isqrt(n)
    if side * side != n:
        raise CompileError(f"the kept-token picture needs a square grid of visual tokens ({family}); this image has {n}")
    return [PictureView("", positions.reshape(side, side), "input")]


class CompilerFamily:
    """The compiler's side of one model family (see the module docstring).

    Subclasses set :attr:`specs` and :attr:`prompt_template` and implement :meth:`processor`,
    :meth:`vision_shape`, :meth:`vision_flops_per_row` and :meth:`picture_views`.
    """

    model_types: tuple[str, ...] = ()
    specs: tuple[ModelSpec, ...] = ()
    """Registry aliases with their embedded configs."""
    prompt_template = ""
    """The single-turn prompt of models outside the registry, with one ``{prompt}`` placeholder."""

    # ------------------------------------------------------------------ processors
    def processor(self, config: Any) -> Any:
        """The family's processor with the built-in tokenizer, sized from the model config (offline)."""
        raise NotImplementedError

    def builtin_processor(self, spec: ModelSpec, config: Any) -> Any:
        """The processor of a built-in alias: :meth:`processor`, unless the spec brings its own tokenizer."""
        return self.processor(config)

    def saved_processor(self, directory: Path, config: Any) -> Any:
        """Load a saved processor when ``AutoProcessor`` cannot; ``None``: no other way than AutoProcessor's."""
        return None

    def fix_processor(self, processor: Any, config: Any) -> Any:
        """Make a loaded processor expand the image placeholder and left-pad, whatever its saved config said."""
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.padding_side = "left"
            if tokenizer.pad_token is None and pad_token_id(config) is not None:
                try:
                    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_token_id(config))
                except Exception:  # noqa: BLE001 - best effort, padding then needs pad_token from the user
                    pass
        return processor

    def batch_images(self, images: list, texts: list) -> list:
        """The ``images`` argument of the family's processor for a batch: ``images`` (one per prompt,
        in order) as the processor takes them (a flat list by default)."""
        return images

    # ------------------------------------------------------------------ vision FLOPs (never part of the budget)
    def vision_shape(self, config: Any) -> VisionShape:
        """The vision encoder's and projector's sizes their FLOPs depend on."""
        raise NotImplementedError

    def vision_flops_per_row(self, model: Any, inputs: dict, shape: VisionShape, image_token_id: int) -> np.ndarray:
        """float [B]: vision encoder + projector FLOPs of each prompt's images, from the model inputs."""
        raise NotImplementedError

    # ------------------------------------------------------------------ pictures
    def picture_views(self, model: Any, inputs: dict, positions: np.ndarray) -> list[PictureView]:
        """Where the prunable tokens of a one-image prompt (``positions``, in order) sit on its picture.

        Raises:
            recipe_compiler.errors.CompileError: the placeholders do not form the family's grid.
        """
        raise NotImplementedError

    # ------------------------------------------------------------------ benchmarks
    def resize_language_model(self, config: dict, text: dict) -> dict:
        """A copy of ``config`` (an embedded config dict) whose language model has the sizes ``text``.

        The vision side stays; what couples it to the language model is adjusted to match.
        """
        config = copy.deepcopy(config)
        config["text_config"].update(text)
        config["text_config"].pop("head_dim", None)
        return config

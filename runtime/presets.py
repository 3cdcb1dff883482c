"""Published recipes as presets: FitPrune's per-layer schedules for LLaVA-1.5-7B as schema-1 recipes.

FitPrune released, for LLaVA-1.5-7B, the number of visual tokens it prunes **at the end of** each
decoder layer for reduction ratios 10 %…90 %. Source: the FitPrune reference code,
https://github.com/ywh187/FitPrune (Ye, Wu, Lin, Zhou, *Fit and Prune: Fast and Training-free Visual
Token Pruning for Multi-modal Large Language Models*, arXiv:2409.10197), shipped with this package
as ``runtime/data/fitprune_published_recipes.json`` (its README names the source and the licence
situation; the same file is ``published_recipes.json`` of the FitPrune conformance vectors). Pruned at the end of layer ``l`` means gone on entry to ``l + 1``, so our per-layer keep
counts are ``keep[0] = 576`` and ``keep[l + 1] = keep[l] - pruned[l]`` (what the last layer prunes
changes nothing in prefill). The recipe carries the ``llava-1.5-7b`` fingerprint, so it applies to
``llava-hf/llava-1.5-7b-hf`` and refuses any other model.

numpy only; reads the JSON file the caller names (``fitprune:40@path.json``), else
``$RECIPE_FITPRUNE_PUBLISHED``, else the packaged copy, so a pip-installed runtime needs nothing beside it.

Example:
    >>> from runtime.presets import fitprune_published, resolve
    >>> recipe = fitprune_published("40")                 # doctest: +SKIP
    >>> recipe = resolve("fitprune:40")                   # or a .safetensors path  # doctest: +SKIP
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import RecipeError
from .recipe import Recipe, load

# The fingerprint of llava-1.5-7b (recipe_compiler's registry config, built on the meta device;
# tests/test_evaluate.py recomputes it and checks this copy).
LLAVA_15_7B_FINGERPRINT = {
    "model_type": "llava",
    "num_layers": 32,
    "hidden_size": 4096,
    "num_heads": 32,
    "num_kv_heads": 32,
    "visual_tokens": 576,
    "config_hash": "b1b6a719f773d267",
}

PRESET_MODELS = {"llava-1.5-7b": LLAVA_15_7B_FINGERPRINT}
PREFIX = "fitprune:"
ENV_PATH = "RECIPE_FITPRUNE_PUBLISHED"
PACKAGED_PATH = Path(__file__).resolve().parent / "data" / "fitprune_published_recipes.json"
"""FitPrune's published schedules, shipped as package data of ``runtime`` (see ``runtime/data/README.md``)."""


def default_published_path() -> Path:
    """``$RECIPE_FITPRUNE_PUBLISHED`` when set, else the packaged :data:`PACKAGED_PATH`.

    Example:
        >>> default_published_path().name                      # doctest: +SKIP
        'fitprune_published_recipes.json'
    """
    if os.environ.get(ENV_PATH):
        return Path(os.environ[ENV_PATH])
    return PACKAGED_PATH


def keep_counts_from_pruned(pruned: Sequence[int], n_visual: int) -> np.ndarray:
    """Per-layer keep counts (alive entering each layer) from counts pruned at the end of each layer.

    Args:
        pruned: int [L], tokens pruned at the end of layer ``l``.
        n_visual: visual tokens entering layer 0.

    Returns:
        int32 [L]: ``keep[0] = n_visual``, ``keep[l + 1] = keep[l] - pruned[l]``.

    Raises:
        RecipeError: a negative count, or more tokens pruned than are alive.

    Example:
        >>> keep_counts_from_pruned([1, 2, 0, 5], 10).tolist()
        [10, 9, 7, 7]
    """
    pruned = np.asarray(pruned, dtype=np.int64)
    if pruned.ndim != 1 or pruned.size == 0:
        raise RecipeError(f"pruned counts must be a non-empty list of integers, got shape {pruned.shape}")
    if np.any(pruned < 0):
        raise RecipeError(f"pruned counts must be non-negative, got {int(pruned.min())} at layer {int(np.argmin(pruned))}")
    keep = n_visual - np.concatenate([[0], np.cumsum(pruned[:-1])])
    if keep[-1] < 0:
        raise RecipeError(f"the schedule prunes {int(np.sum(pruned[:-1]))} tokens but only {n_visual} exist")
    return keep.astype(np.int32)


def fitprune_published(ratio: str | int, path: str | os.PathLike | None = None, model: str = "llava-1.5-7b") -> Recipe:
    """FitPrune's published recipe for ``model`` at reduction ``ratio`` (percent label) as a :class:`Recipe`.

    Args:
        ratio: the released label, e.g. ``"40"`` or ``40`` (10, 20, …, 90, 55 and 0 exist).
        path: a ``published_recipes.json`` file; default :func:`default_published_path`
            (``$RECIPE_FITPRUNE_PUBLISHED``, else the copy packaged with the runtime).
        model: only ``"llava-1.5-7b"`` has a preset fingerprint today.

    Raises:
        RecipeError: no file, unknown model or ratio, a malformed schedule.
    """
    if model not in PRESET_MODELS:
        raise RecipeError(f"no FitPrune preset for {model!r}; presets exist for {', '.join(PRESET_MODELS)}")
    source = Path(path) if path is not None else default_published_path()
    if path is None and source == PACKAGED_PATH and not source.is_file():
        raise RecipeError(
            f"FitPrune's published recipes are missing from this installation ({source}); reinstall recipe-compiler, "
            f"or pass a published_recipes.json (fitprune:RATIO@path.json or ${ENV_PATH})"
        )
    try:
        table = json.loads(Path(source).read_text())
    except (OSError, ValueError) as exc:
        raise RecipeError(f"cannot read FitPrune presets from {source}: {exc}") from None
    schedules = table.get(model) if isinstance(table, dict) else None
    if not isinstance(schedules, dict):
        raise RecipeError(f"{source} has no {model!r} schedules")
    label = str(ratio).rstrip("%")
    if label not in schedules:
        raise RecipeError(f"FitPrune published no {label!r}% recipe for {model}; available: {', '.join(sorted(schedules, key=float))}")
    fingerprint = dict(PRESET_MODELS[model])
    pruned = schedules[label]
    if len(pruned) != fingerprint["num_layers"]:
        raise RecipeError(f"the {label}% schedule has {len(pruned)} layers but {model} has {fingerprint['num_layers']}")
    keep = keep_counts_from_pruned(pruned, fingerprint["visual_tokens"])
    return Recipe(
        keep_count=keep, scorer="fitprune", head_reduce="max", fingerprint=fingerprint,
        provenance={"search": "fitprune-published", "search_params": {"reduction_ratio": label}, "source": "FitPrune reference code (published_recipes.json)"},
    )


def resolve(spec: str | os.PathLike) -> Recipe:
    """A recipe from a file path, or a preset ``fitprune:RATIO`` / ``fitprune:RATIO@PATH.json``.

    Example:
        >>> resolve("fitprune:40").keep_count[:4].tolist()   # doctest: +SKIP
        [576, 576, 575, 554]
    """
    text = str(spec)
    if text.startswith(PREFIX):
        ratio, _, path = text[len(PREFIX):].partition("@")
        return fitprune_published(ratio, path or None)
    return load(spec)

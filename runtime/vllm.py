"""Serve a recipe's pre-LLM stage inside vLLM: ``LLM(model=..., hf_overrides=overrides("recipe.safetensors"))``.

This module is lean: it imports vLLM only inside :func:`register`, which vLLM itself calls through
the ``vllm.general_plugins`` entry point in every process it starts. The model classes live in
:mod:`runtime.vllm_models`, which vLLM imports lazily when an engine selects one of them.

What is served: the recipe's **pre-LLM stage** (g-prune, fopru-rank or fopru-row), which drops
visual tokens before the language model. Its count, ``round_half_up(r · n)`` per view, depends only
on the image size, so vLLM's prompt gets exactly that many placeholders (continuous batching,
paged KV and prefix caching work unchanged) and the model returns only the kept projected
features, in their original order, at their **original positions** (as the HF runtime keeps
them). An in-LLM per-layer schedule does not fit paged KV (every layer of a vLLM KV block holds
the same tokens): a recipe that has one is served with its stage only, and this is logged once
(``in_llm_schedule="refuse"`` refuses it instead).

Refused, each with one line (:class:`runtime.RecipeError`): a recipe with no pre-LLM stage (there
is nothing to serve; serve the model without ``hf_overrides``), ``cls-inflection`` (its count
depends on image content, so the prompt cannot be sized before the encoder runs), a model type
without a plugin class, and, at engine start, a recipe whose fingerprint does not match the
model's config (:class:`runtime.RecipeMismatchError`).

Example:
    >>> from vllm import LLM                                                  # doctest: +SKIP
    >>> import runtime.vllm                                                   # doctest: +SKIP
    >>> llm = LLM(model="llava-hf/llava-1.5-7b-hf",
    ...           hf_overrides=runtime.vllm.overrides("recipe.safetensors"))  # doctest: +SKIP
"""
from __future__ import annotations

import json
import os
from typing import Any

from .errors import RecipeError
from .families import FAMILIES
from .methods.stages import STAGES

SERVED_STAGES = ("g-prune", "fopru-rank", "fopru-row")
"""The pre-LLM stages whose selection the vLLM model classes compute (:mod:`runtime.vllm_models`)."""
from .recipe import Recipe, load

CONFIG_KEY = "recipe_compiler_recipe"
"""The ``hf_config`` attribute that carries the recipe into every vLLM process."""

IN_LLM_CHOICES = ("serve-stage", "refuse")


def architectures() -> dict[str, str]:
    """``model_type`` → the architecture this plugin registers for it (the families that declare one)."""
    return {name: family.vllm_architecture for name, family in FAMILIES.items() if family.vllm_architecture}

__all__ = ["CONFIG_KEY", "architectures", "IN_LLM_CHOICES", "overrides", "overrides_json", "recipe_from_config", "register"]


def overrides(recipe: str | os.PathLike | Recipe, *, in_llm_schedule: str = "serve-stage") -> dict:
    """The ``hf_overrides`` that serve ``recipe``'s pre-LLM stage with vLLM.

    Args:
        recipe: a recipe file (or a loaded :class:`runtime.Recipe`) with a fixed-ratio pre-LLM stage.
        in_llm_schedule: what to do when the recipe also has an in-LLM schedule, which vLLM's paged
            KV cache cannot run: ``"serve-stage"`` (default) serves the stage only and says so once
            in vLLM's log; ``"refuse"`` raises.

    Returns:
        A JSON-able dict for ``LLM(hf_overrides=...)``; ``json.dumps`` of it is the server's
        ``--hf-overrides`` value (see :func:`overrides_json`). It selects the plugin's
        architecture, carries the recipe, and gives the LLaVA language model an M-RoPE section
        that reads one position row (identical to plain RoPE), so kept tokens keep their
        original positions.

    Raises:
        RecipeError: the file is not a valid recipe, has no pre-LLM stage, has ``cls-inflection``,
            has an in-LLM schedule with ``in_llm_schedule="refuse"``, or is for a model type the
            plugin does not serve (the message says which and what to do).

    Example:
        >>> overrides("recipe.safetensors")["architectures"]   # doctest: +SKIP
        ['RecipePrunedLlavaForConditionalGeneration']
    """
    if in_llm_schedule not in IN_LLM_CHOICES:
        raise ValueError(f"in_llm_schedule={in_llm_schedule!r} is unknown; use one of {', '.join(IN_LLM_CHOICES)}")
    r = recipe if isinstance(recipe, Recipe) else load(recipe)
    family = r.fingerprint["model_type"]
    method = r.pre_llm.get("method", "none")
    if method == "none":
        raise RecipeError(
            "the recipe has no pre-LLM stage, and vLLM can serve only a recipe's pre-LLM stage (its in-LLM "
            "schedule does not fit paged KV); serve the model without hf_overrides, or compile with --pre-llm"
        )
    fixed = [name for name, stage in STAGES.items() if stage.fixed_ratio]
    if method not in fixed:
        raise RecipeError(
            f"pre-LLM stage {method!r} keeps a per-image count that depends on the image's content, so vLLM "
            f"cannot size the prompt before the encoder runs; compile with --pre-llm {'/'.join(fixed)}"
        )
    if method not in SERVED_STAGES:
        raise RecipeError(
            f"pre-LLM stage {method!r} is not served by the vLLM plugin (it computes the scores of "
            f"{', '.join(SERVED_STAGES)} only); compile with --pre-llm {'/'.join(SERVED_STAGES)} to serve in vLLM, "
            "or apply this recipe with the HF runtime"
        )
    served = architectures()
    if family not in served:
        why = FAMILIES[family].vllm_refusal if family in FAMILIES else f"model type {family!r} has no vLLM plugin class"
        raise RecipeError(f"{why}; the vLLM plugin serves {', '.join(served)}")
    if r.pruning_layers and in_llm_schedule == "refuse":
        raise RecipeError(
            f"the recipe also prunes inside the language model (layers {r.pruning_layers}), which vLLM's paged KV "
            "cache cannot do; pass in_llm_schedule='serve-stage' to serve its pre-LLM stage only"
        )
    payload = {
        "keep_count": [int(v) for v in r.keep_count],
        "scorer": r.scorer,
        "fingerprint": r.fingerprint,
        "head_reduce": r.head_reduce,
        "pre_llm": r.pre_llm,
        "provenance": r.provenance,
    }
    out: dict[str, Any] = {"architectures": [served[family]], CONFIG_KEY: payload}
    # One position row drives every rotary frequency: plain RoPE, but vLLM then takes per-request
    # positions from the model, so a kept token keeps its original index.
    head_dim = r.fingerprint["hidden_size"] // r.fingerprint["num_heads"]
    out["text_config"] = {"rope_parameters": {"mrope_section": [head_dim // 2, 0, 0]}}
    return json.loads(json.dumps(out))  # plain JSON types only (it crosses processes and the CLI)


def overrides_json(recipe: str | os.PathLike | Recipe, **options: Any) -> str:
    """:func:`overrides` as the JSON string ``vllm serve --hf-overrides`` takes.

    Example:
        >>> overrides_json("recipe.safetensors")[:17]   # doctest: +SKIP
        '{"architectures":'
    """
    return json.dumps(overrides(recipe, **options), separators=(",", ":"))


def recipe_from_config(hf_config: Any) -> Recipe:
    """The :class:`runtime.Recipe` carried by an ``hf_config`` that :func:`overrides` set up.

    Raises:
        RecipeError: the config carries none, or it is not a valid recipe.
    """
    payload = getattr(hf_config, CONFIG_KEY, None)
    if not isinstance(payload, dict):
        raise RecipeError(f"the model config has no {CONFIG_KEY}; pass hf_overrides=runtime.vllm.overrides('recipe.safetensors')")
    try:
        return Recipe(**payload)
    except TypeError as exc:
        raise RecipeError(f"{CONFIG_KEY} in the model config is not a recipe: {exc}") from None


def register() -> None:
    """Register the plugin's model classes with vLLM (the ``vllm.general_plugins`` entry point).

    vLLM calls this in every process it starts; it only records lazy ``"module:Class"`` names, so
    nothing is imported until an engine selects one of the architectures.
    """
    from vllm import ModelRegistry

    for arch in architectures().values():
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, f"runtime.vllm_models:{arch}")

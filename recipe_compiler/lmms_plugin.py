"""An lmms-eval model plugin: evaluate a pruned model on any lmms-eval ``generate_until`` task.

Registered through the ``lmms_eval.models`` entry-point group (see ``pyproject.toml``), so once
this package is installed next to lmms-eval:

    lmms-eval --model recipe_llava --model_args pretrained=llava-1.5-7b,recipe=r.safetensors --tasks mme

``pretrained`` is anything ``recipe-compile --model`` accepts (a registry alias such as
``tiny-llava`` or ``llava-1.5-7b``, a hub id, a local directory); ``recipe`` is a recipe file or a
preset such as ``fitprune:40`` (omit it for the unpruned model). Other arguments: ``device``
(default cpu), ``dtype`` (float32), ``attn_implementation`` (sdpa), ``random_weights`` (false),
``seed``, ``max_new_tokens`` (default 32, a task's ``generation_kwargs`` win).

This module imports lmms-eval only when lmms-eval loads it; the package never depends on it.
"""
from __future__ import annotations

MODEL_ID = "recipe_llava"


def manifest():
    """The entry point's payload: a ModelManifest for :class:`RecipeLlava` (imported lazily)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path="recipe_compiler.lmms_model.RecipeLlava")

"""recipe-compiler: compile visual-token pruning recipes for vision-language models.

The offline side: calibration (:mod:`.collect`), FLOPs (:mod:`.flops`), divergence and searches
(:mod:`.divergence`, :mod:`.search`), verification (:mod:`.verify`) and the CLI (:mod:`.cli`).
Recipes are applied in production by the separate, lean :mod:`runtime` package.

Example:
    >>> from recipe_compiler import CompileConfig, compile_recipe, load_calibration, load_model   # doctest: +SKIP
    >>> m = load_model("tiny-llava")                                                                # doctest: +SKIP
    >>> result = compile_recipe(m.model, m.processor, load_calibration(), CompileConfig(budget=0.45),
    ...                         format_prompt=m.format_prompt)                                     # doctest: +SKIP
    >>> result.recipe.save("recipe.safetensors")                                                    # doctest: +SKIP
"""
import importlib

# The public names, imported on first use (PEP 562): the console scripts import this package
# first, and keeping that import light lets them turn a Ctrl-C during the heavy imports into one line.
_EXPORTS = {
    "CompileConfig": ".compile",
    "CompileResult": ".compile",
    "compile_recipe": ".compile",
    "load_calibration": ".calibration",
    "load_model": ".models",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(_EXPORTS))

"""recipe-compiler's lean runtime: load a pruning recipe and apply it to a stock HF model.

Imports only torch, numpy, safetensors-format parsing and (lazily) transformers.

Example:
    >>> from runtime import load                                  # doctest: +SKIP
    >>> handle = load("recipe.safetensors").apply(model)          # doctest: +SKIP
    >>> model.generate(**inputs)                                  # doctest: +SKIP
    >>> handle.remove()                                           # doctest: +SKIP
"""
from .compat import warn_if_untested
from .errors import PruningUnsupportedError, RecipeAlreadyAppliedError, RecipeError, RecipeMismatchError, UnsupportedModelError
from .recipe import Recipe, load

__all__ = ["PruningUnsupportedError", "Recipe", "RecipeAlreadyAppliedError", "RecipeError", "RecipeMismatchError",
           "UnsupportedModelError", "load"]

warn_if_untested()  # a transformers release outside the tested range (runtime.compat); reads metadata only

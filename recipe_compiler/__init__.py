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
from .calibration import load_calibration
from .compile import CompileConfig, CompileResult, compile_recipe
from .models import load_model

__all__ = ["CompileConfig", "CompileResult", "compile_recipe", "load_calibration", "load_model"]

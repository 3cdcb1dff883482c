"""Model families on the compiler's side, registered by ``model_type``; their aliases form the model registry.

One module per family (:mod:`.base` defines the kind and its registries); adding a family is one
module here and one line below, with its runtime half in :mod:`runtime.families`.

Example:
    >>> from recipe_compiler.families import ALIASES, FAMILIES
    >>> sorted(FAMILIES)
    ['internvl', 'llava', 'llava_next', 'llava_onevision', 'qwen2_5_vl', 'qwen2_vl', 'qwen3_5', 'qwen3_vl']
    >>> ALIASES["tiny-qwen2.5-vl"].config["model_type"]
    'qwen2_5_vl'
"""
from .base import (ALIASES, FAMILIES, CompilerFamily, ModelSpec, PictureView, config_from_dict, family_of, lm_shape,
                   register_family, registry_vision_flops, vision_shape)

from . import llava  # noqa: F401
from . import llava_next  # noqa: F401
from . import qwen2_vl  # noqa: F401
from . import qwen2_5_vl  # noqa: F401
from . import internvl  # noqa: F401
from . import llava_onevision  # noqa: F401
from . import qwen3_vl  # noqa: F401
from . import qwen3_5  # noqa: F401
from . import gemma3  # noqa: F401

__all__ = ["ALIASES", "FAMILIES", "CompilerFamily", "ModelSpec", "PictureView", "config_from_dict", "family_of", "lm_shape",
           "register_family", "registry_vision_flops", "vision_shape"]

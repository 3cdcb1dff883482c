"""Model families: everything the runtime knows about each one, registered by ``model_type``.

One module per family (:mod:`.base` defines the kind and its registry); adding a family is one
module here and one line below.

Example:
    >>> from runtime.families import family_for, model_fingerprint, supported_model_types
    >>> supported_model_types()
    ['gemma3', 'internvl', 'llava', 'llava_next', 'llava_onevision', 'qwen2_5_vl', 'qwen2_vl', 'qwen3_5', 'qwen3_vl']
"""
from .base import FAMILIES, Encoded, Family, View, family_for, model_fingerprint, register_family, supported_model_types

from . import llava  # noqa: F401
from . import llava_next  # noqa: F401
from . import qwen2_vl  # noqa: F401
from . import qwen2_5_vl  # noqa: F401
from . import internvl  # noqa: F401
from . import llava_onevision  # noqa: F401
from . import qwen3_vl  # noqa: F401
from . import qwen3_5  # noqa: F401
from . import gemma3  # noqa: F401

__all__ = ["FAMILIES", "Encoded", "Family", "View", "family_for", "model_fingerprint", "register_family", "supported_model_types"]

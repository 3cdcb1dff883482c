"""In-LLM scorers, one module each, registered by name (:data:`SCORERS`, in this order).

Example:
    >>> from runtime.methods.scorers import SCORERS
    >>> SCORERS.names()
    ('fitprune', 'text-mean', 'last-token', 'pdrop', 'dart', 'sparsevlm', 'random')
"""
from .base import SCORERS, Scorer, register_scorer

from . import fitprune  # noqa: F401
from . import text_mean  # noqa: F401
from . import last_token  # noqa: F401
from . import pdrop  # noqa: F401
from . import dart  # noqa: F401
from . import sparsevlm  # noqa: F401
from . import random_keep  # noqa: F401

__all__ = ["SCORERS", "Scorer", "register_scorer"]

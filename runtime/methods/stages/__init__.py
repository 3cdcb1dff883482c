"""Pre-LLM stages, one module each, registered by name (:data:`STAGES`, in this order).

Example:
    >>> from runtime.methods.stages import STAGES
    >>> STAGES.names()
    ('g-prune', 'fopru-rank', 'fopru-row', 'cls-inflection', 'divprune', 'visionzip', 'vtc-cls', 'prumerge-plus', 'random')
"""
from .base import NO_STAGE, STAGES, Selection, Stage, register_stage

from . import g_prune  # noqa: F401
from . import fopru_rank  # noqa: F401
from . import fopru_row  # noqa: F401
from . import cls_inflection  # noqa: F401
from . import divprune  # noqa: F401
from . import visionzip  # noqa: F401
from . import vtc_cls  # noqa: F401
from . import prumerge_plus  # noqa: F401
from . import random_keep  # noqa: F401

__all__ = ["NO_STAGE", "STAGES", "Selection", "Stage", "register_stage"]

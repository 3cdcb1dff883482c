"""DART's schedule (``--search dart``): one cut on entry to layer ``K = 2``, the count meeting the budget.

DART (ZichenWen1/DART; docs/methods.md) keeps, entering layer ``K``, 4 image pivots plus
``max_num_trunction // 8`` image tokens per pivot (132 of 576 at the default 128), chosen by key
norms and cosine similarity (the ``dart`` scorer). This search keeps the most tokens at ``K``
whose exact FLOPs (the scorer's norms and similarities included) meet the budget. Paper setting:
``--search-param max_num_trunction=128`` (320 for LLaVA-NeXT), which keeps
:func:`runtime.peer_math.dart.retained_count` tokens.

Example:
    >>> import numpy as np
    >>> cost = np.tile(np.arange(5.0), (4, 1)) + 10
    >>> dart_schedule(np.zeros((4, 5)), cost, budget_flops=50.0)[0].tolist()
    [4, 4, 1, 1]
"""
from __future__ import annotations

import numpy as np

from runtime.peer_math import dart as reference

from .base import Param, is_int_in, register_search
from .fastv import one_cut, one_cut_search


def paper_schedule(num_layers: int, v_ref: int) -> np.ndarray:
    """The repository default: K = 2, ``max_num_trunction`` 128 scaled to the image (132 of 576)."""
    count = reference.retained_count(v_ref, max(8, round(128 * v_ref / 576)))
    return one_cut(num_layers, v_ref, min(reference.DEFAULT_LAYER, num_layers - 1), min(count, v_ref))


@register_search(
    "dart", provenance="dart", title="DART", scorer="dart", example=paper_schedule,
    params={
        "layer": Param(None, is_int_in(1), "an integer K >= 1 below the model's depth (paper: 2)",
                       "the layer on whose entry DART cuts (default 2, earlier only where the budget needs it)"),
        "max_num_trunction": Param(None, is_int_in(0), "a non-negative integer (paper: 128; LLaVA-NeXT 320)",
                                   "the reference's token budget (default: the most tokens the budget allows)"),
    },
)
def dart_schedule(table, cost, budget_flops, extra=lambda keep: 0.0, layer=None, max_num_trunction=None):
    """DART's one-cut schedule under ``budget_flops``; returns ``(keep, found)`` (see :func:`one_cut_search`)."""
    v_ref = cost.shape[1] - 1
    fixed = None
    if max_num_trunction is not None:
        count = min(v_ref, reference.retained_count(v_ref, max_num_trunction))
        fixed = (count, f"max_num_trunction {max_num_trunction}", "max_num_trunction")
    return one_cut_search("DART", cost, budget_flops, extra, layer, reference.DEFAULT_LAYER, fixed)

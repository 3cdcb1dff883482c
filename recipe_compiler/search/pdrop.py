"""PyramidDrop's schedule (``--search pdrop``): stages at ``s·L/4``, ``int(n·λ^s)`` survivors, λ bisected.

PyramidDrop (Cooperx521/PyramidDrop; docs/methods.md) cuts on entry to layers 8, 16 and 24 of
LLaVA-1.5's 32 (:func:`runtime.peer_math.pdrop.stage_layers` scales them to depth), keeping
``int(n·λ^s)`` image tokens in stage ``s``, ranked by the pruning layer's own q/k (the ``pdrop``
scorer). This search bisects λ to the largest value whose exact FLOPs, the scorer's own
projections included, meet the budget. Paper setting: ``--search-param lam=0.5``.

Example:
    >>> import numpy as np
    >>> cost = np.tile(np.arange(9.0), (8, 1)) + 10          # 8 layers, 8 reference tokens
    >>> keep, found = pdrop_schedule(np.zeros((8, 9)), cost, budget_flops=8 * 14.0)
    >>> keep.tolist(), found["layers"]
    ([8, 8, 4, 4, 3, 3, 1, 1], [2, 4, 6])
"""
from __future__ import annotations

import numpy as np

from runtime.peer_math import pdrop as reference

from ..errors import BudgetError
from .base import Param, is_int_in, is_number_in, register_search


def stage_schedule(num_layers: int, v_ref: int, layers, lam: float) -> np.ndarray:
    """int64 [L]: ``int(v·λ^s)`` from stage layer ``s`` on (the reference's count rule)."""
    keep = np.full(num_layers, v_ref, dtype=np.int64)
    for count, layer in zip(reference.stage_counts(v_ref, lam, len(layers))[1:], layers):
        keep[layer:] = count
    return keep


def paper_schedule(num_layers: int, v_ref: int) -> np.ndarray:
    """The README's setting: layers ``s·L // 4``, λ = 0.5."""
    return stage_schedule(num_layers, v_ref, reference.stage_layers(num_layers), reference.DEFAULT_LAMBDA)


def _layers_for(num_layers: int, first: int, stages: int) -> tuple[int, ...]:
    if first == num_layers // (stages + 1) or first * stages >= num_layers:
        return reference.stage_layers(num_layers, stages)
    return tuple(first * s for s in range(1, stages + 1))


@register_search(
    "pdrop", provenance="pyramiddrop", title="PyramidDrop", scorer="pdrop", example=paper_schedule,
    params={
        "lam": Param(None, is_number_in(0.0, 1.0), "a number in [0, 1] (paper: 0.5)",
                     "a fixed ratio λ (default: the largest the budget allows)"),
        "first_layer": Param(None, is_int_in(1), "an integer >= 1 with stages·first_layer below the depth",
                             "the first stage's layer; the stages are its multiples (default L/4: 8, 16, 24 of 32)"),
        "stages": Param(3, is_int_in(1, 8), "an integer in [1, 8] (paper: 3)", "number of stages (default 3)"),
    },
)
def pdrop_schedule(table, cost, budget_flops, extra=lambda keep: 0.0, lam=None, first_layer=None, stages=3):
    """PyramidDrop's schedule under ``budget_flops``; returns ``(keep, found)``.

    With the default layers, a budget that even λ = 0 cannot meet moves the stages earlier (the
    first stage to the latest layer that meets it, the others its multiples), recorded as
    ``found["layers_moved"]``; given layers never move.

    Raises:
        BudgetError: the budget cannot be met at the given (or earliest) layers, or by the fixed λ.
    """
    num_layers, v_ref = cost.shape[0], cost.shape[1] - 1
    default_first = num_layers // (stages + 1)
    if stages >= num_layers or default_first < 1:
        raise ValueError(f"PyramidDrop with {stages} stages needs more than {stages} layers per stage boundary; "
                         f"this model has {num_layers}: use --search-param stages=N with fewer stages")
    if first_layer is not None and first_layer * stages >= num_layers:
        raise ValueError(f"PyramidDrop first_layer {first_layer} puts stage {stages} at layer {first_layer * stages}, "
                         f"past the model's {num_layers} layers; use a smaller --search-param first_layer")
    rows = np.arange(num_layers)
    full = float(cost[rows, v_ref].sum())
    limit = budget_flops * (1 + 1e-9)

    def flops(layers, lam_: float) -> float:
        keep = stage_schedule(num_layers, v_ref, layers, lam_)
        return float(cost[rows, keep].sum()) + extra(keep)

    firsts = [first_layer] if first_layer is not None else list(range(default_first, 0, -1))
    chosen = None
    for first in firsts:
        layers = _layers_for(num_layers, first, stages)
        if lam is not None:
            if flops(layers, lam) <= limit:
                chosen = (layers, lam)
                break
        elif flops(layers, 0.0) <= limit:
            low, high = 0.0, 1.0  # counts (and FLOPs) are non-decreasing in λ
            if flops(layers, 1.0) <= limit:
                low = 1.0
            for _ in range(60):
                mid = (low + high) / 2
                if flops(layers, mid) <= limit:
                    low = mid
                else:
                    high = mid
            chosen = (layers, low)
            break
    if chosen is None:
        layers = _layers_for(num_layers, firsts[-1], stages)
        spent = flops(layers, 0.0 if lam is None else lam) / full
        what = "even λ = 0" if lam is None else f"λ = {lam:g}"
        raise BudgetError(f"PyramidDrop at layers {list(layers)} cannot meet budget {budget_flops / full:.4g}: {what} spends "
                          f"{spent:.4f} of the prefill FLOPs; use --budget {np.ceil(spent * 1000) / 1000:g} or more")
    layers, lam_found = chosen
    keep = stage_schedule(num_layers, v_ref, layers, lam_found)
    found = {"layers": [int(l) for l in layers], "lam": float(lam_found), "counts": [int(keep[l]) for l in layers]}
    if first_layer is None and layers != reference.stage_layers(num_layers, stages):
        found["layers_moved"] = f"the stages at {list(reference.stage_layers(num_layers, stages))} cannot meet the budget"
    return keep, found

"""``--search gsearch``: G-Search, a greedy shallow → deep schedule under a divergence tolerance.

Pure numpy. METHODS.md §2: for a tolerance ``ε``, walk the layers from shallow to deep and give
layer ``i`` the smallest keep count ``k_i <= k_{i-1}`` whose divergence ``table[i, k_i]`` stays
within ``ε`` (if none does, the layer keeps ``k_{i-1}``: nothing can be added back). ``ε`` is then
set to the smallest tolerance whose schedule fits the FLOPs budget.

The paper drives each greedy step by Bayesian optimisation on task accuracy, which needs labelled
data and model evaluations. Here the step's objective is the calibration divergence
(:func:`recipe_compiler.divergence.divergence_table`), so no labels are needed and the search runs
offline on the statistics.

Bisection on ``ε``: the greedy schedule is piecewise constant in ``ε`` and changes only where
``ε`` crosses an entry of the table, so the candidates are the distinct finite entries of layers
``1 … L−1``; a larger ``ε`` never keeps more tokens at any layer (elementwise), so with FLOPs rows
that do not decrease in ``k`` (every real cost table) the schedule's FLOPs are non-increasing in
``ε`` and a bisection over the sorted candidates finds the smallest feasible one exactly. With
arbitrary cost rows the bisection's answer is checked and, if it misses the budget, the candidates
are scanned in order. Forbidden (``+inf``) entries are never chosen by a greedy step.

Deterministic: no randomness; ties prefer the smaller ``ε``.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from recipe_compiler.errors import BudgetError
from recipe_compiler.search.base import register_search, schedule_flops
from recipe_compiler.search.optimal import _check_inputs, _check_probes

__all__ = ["gsearch_schedule", "gsearch_greedy"]


def gsearch_greedy(table: Any, epsilon: float) -> np.ndarray:
    """The greedy G-Search schedule for one tolerance.

    Args:
        table: float ``[L, V + 1]``, divergence of keeping ``k`` visual tokens entering layer ``l``
            (``+inf`` marks forbidden entries).
        epsilon: the tolerance: layer ``i`` keeps the fewest tokens ``k <= k_{i-1}`` with
            ``table[i, k] <= epsilon`` (``k_{i-1}`` if there is none).

    Returns:
        int64 ``[L]`` keep counts, ``k_0 = V``, non-increasing.

    Example:
        >>> import numpy as np
        >>> table = np.array([[np.inf, np.inf, 0.0], [2.0, 0.5, 0.0], [1.0, 0.2, 0.0]])
        >>> gsearch_greedy(table, 0.5).tolist()
        [2, 1, 1]
        >>> gsearch_greedy(table, 1.0).tolist()
        [2, 1, 0]
    """
    t = np.asarray(table, dtype=np.float64)
    L, n = t.shape
    k = np.empty(L, dtype=np.int64)
    k[0] = n - 1
    for i in range(1, L):
        row = t[i, : k[i - 1] + 1]
        allowed = np.flatnonzero(np.isfinite(row) & (row <= epsilon))
        k[i] = allowed[0] if allowed.size else k[i - 1]
    return k


@register_search("gsearch", provenance="greedy-epsilon-bisection")
def gsearch_schedule(table: Any, cost: Any, budget_flops: float, probes: Any = None) -> np.ndarray:
    """G-Search: the greedy schedule at the smallest divergence tolerance that fits the budget.

    Args:
        table: float ``[L, V + 1]``, divergence of keeping ``k`` visual tokens entering layer
            ``l`` (``+inf`` marks forbidden entries), e.g. from
            :func:`recipe_compiler.divergence.divergence_table`.
        cost: float ``[L, V + 1]``, FLOPs of layer ``l`` with ``k`` visual tokens, e.g. from
            :func:`recipe_compiler.flops.cost_table`.
        budget_flops: allowed total ``Σ_l cost[l, k_l]`` plus the probes of the cuts.
        probes: float ``[L, V + 1]`` or None: a cut into ``l`` from ``x`` tokens costs
            ``probes[l, x]`` (:func:`recipe_compiler.flops.probe_table`). A larger ``ε`` still
            keeps fewer tokens everywhere but may cut at more layers, so with probes the FLOPs
            are monotone in ``ε`` only nearly: the bisection's result is checked and, if it
            misses, the candidates are scanned in order.

    Returns:
        int64 ``[L]`` keep counts with ``k_0 = V``, non-increasing, within the budget.

    Raises:
        BudgetError: the budget is not positive, or no tolerance gives a schedule within it (the
            message gives the cheapest greedy schedule's FLOPs).
        ValueError: malformed table or cost.

    Example:
        >>> import numpy as np
        >>> table = np.array([[np.inf, np.inf, np.inf, 0.0], [2.0, 2.0, 2.0, 0.0], [4.0, 3.0, 3.0, 0.0]])
        >>> cost = np.tile([1.0, 2.0, 3.0, 4.0], (3, 1))
        >>> gsearch_schedule(table, cost, budget_flops=8.0).tolist()  # objective 6; optimal: [3, 1, 1], 5
        [3, 0, 0]
    """
    t, c, budget = _check_inputs(table, cost, budget_flops)
    probes = _check_probes(probes, t.shape)
    L = t.shape[0]
    rows = np.arange(L)

    def flops(k: np.ndarray) -> float:
        return schedule_flops(c, k, probes)

    def fits(k: np.ndarray) -> bool:
        return flops(k) <= budget and bool(np.all(np.isfinite(t[rows, k])))

    body = t[1:]
    candidates = np.unique(body[np.isfinite(body)])  # sorted ascending
    if candidates.size == 0:  # L == 1, or every pruning entry forbidden: the only schedule keeps all
        candidates = np.array([0.0])

    # Bisection: the smallest candidate index whose schedule fits (monotone for real cost tables).
    lo, hi = 0, candidates.size - 1
    if not fits(gsearch_greedy(t, candidates[hi])):
        hi = -1
    else:
        while lo < hi:
            mid = (lo + hi) // 2
            if fits(gsearch_greedy(t, candidates[mid])):
                hi = mid
            else:
                lo = mid + 1
    if hi >= 0:
        return gsearch_greedy(t, candidates[hi])

    loosest = gsearch_greedy(t, candidates[-1])
    least = flops(loosest)
    if np.any(np.diff(c[1:], axis=1) < 0) or probes is not None:
        # Cost rows that decrease somewhere in k: FLOPs need not be monotone in ε, scan in order.
        for eps in candidates:
            k = gsearch_greedy(t, eps)
            if fits(k):
                return k
            if np.all(np.isfinite(t[rows, k])):
                least = min(least, flops(k))
    raise BudgetError(
        f"budget of {budget:.6g} FLOPs cannot be met by gsearch; its cheapest greedy schedule needs "
        f"{least:.6g} FLOPs: raise the budget"
    )

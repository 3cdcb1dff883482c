"""``--search psigmoid``: P-Sigmoid, a smooth three-parameter keep-ratio schedule.

Pure numpy/scipy. METHODS.md §2: the keep ratio entering layer ``l >= 1`` is

    ``r(l) = b + (1 − b) / (1 + exp(s·(l − m)))``

(midpoint ``m``, steepness ``s``, floor ``b``); ``r(0) = 1``. The keep counts are
``k_l = round_half_up(r(l)·V)``, clipped to ``[0, V]`` and made non-increasing by a running minimum
(rounding alone can only break monotonicity by ties, never by more). Parameter bounds:

* ``m ∈ [0, L − 1]`` (the drop happens inside the stack),
* ``s ∈ [0.05, 10]`` (from a near-linear ramp over a long stack to a step at ``m``),
* ``b ∈ [0, 1]`` (``b = 1`` keeps everything).

The parameters minimise ``Σ_l table[l, k_l]`` subject to ``Σ_l cost[l, k_l] <= budget`` with
:func:`scipy.optimize.differential_evolution` (fixed seed, no polishing: the objective is piecewise
constant in the parameters) on a penalised objective: a feasible schedule scores its divergence, an
infeasible one a constant above every feasible score plus its relative FLOPs excess, so the search
is pulled towards the budget. A deterministic grid over the box (which includes the step
``(m, s, b) = (0, 10, 0)``, i.e. the cheapest schedule ``(V, 0, …, 0)`` for ``V`` below about
11 000) seeds the search, and every schedule evaluated is considered: the result is the best
**feasible** one (ties: fewer FLOPs, then the first found).

Deterministic: fixed seed, serial evaluation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import differential_evolution

from recipe_compiler.errors import BudgetError
from recipe_compiler.search.base import register_search, schedule_flops
from recipe_compiler.search.optimal import _check_inputs, _check_probes

__all__ = [
    "STEEPNESS_BOUNDS",
    "FLOOR_BOUNDS",
    "PSigmoidFit",
    "midpoint_bounds",
    "psigmoid_counts",
    "psigmoid_fit",
    "psigmoid_schedule",
]

STEEPNESS_BOUNDS = (0.05, 10.0)
FLOOR_BOUNDS = (0.0, 1.0)

_SEED = 0
_GRID = 9  # grid points per parameter for the seeding grid (9**3 = 729 schedules)
_MAXITER = 60
_POPSIZE = 15


def midpoint_bounds(num_layers: int) -> tuple[float, float]:
    """Bounds of the midpoint ``m`` for a stack of ``num_layers`` layers: ``(0, L − 1)``.

    Example:
        >>> midpoint_bounds(32)
        (0.0, 31.0)
    """
    return 0.0, float(max(int(num_layers) - 1, 0))


@dataclass(frozen=True)
class PSigmoidFit:
    """A fitted P-Sigmoid schedule.

    Attributes:
        midpoint: ``m``, within :func:`midpoint_bounds`.
        steepness: ``s``, within :data:`STEEPNESS_BOUNDS`.
        floor: ``b``, within :data:`FLOOR_BOUNDS`.
        schedule: int64 ``[L]`` keep counts (``k_0 = V``, non-increasing).
        objective: ``Σ_l table[l, k_l]``.
        flops: ``Σ_l cost[l, k_l]`` plus the probes of its cuts (within the budget).
    """

    midpoint: float
    steepness: float
    floor: float
    schedule: np.ndarray
    objective: float
    flops: float


def _counts(params: np.ndarray, num_layers: int, V: int) -> np.ndarray:
    """Keep counts for parameter rows ``[n, 3]`` → int64 ``[n, L]``."""
    p = np.atleast_2d(np.asarray(params, dtype=np.float64))
    m, s, b = p[:, 0:1], p[:, 1:2], p[:, 2:3]
    layers = np.arange(num_layers, dtype=np.float64)[None, :]
    with np.errstate(over="ignore"):
        ratio = b + (1.0 - b) / (1.0 + np.exp(s * (layers - m)))
    ratio[:, 0] = 1.0
    k = np.clip(np.floor(ratio * V + 0.5), 0, V).astype(np.int64)
    return np.minimum.accumulate(k, axis=1)


def psigmoid_counts(midpoint: float, steepness: float, floor: float, num_layers: int, V: int) -> np.ndarray:
    """The P-Sigmoid keep counts for given parameters.

    Args:
        midpoint: ``m``.
        steepness: ``s``.
        floor: ``b``.
        num_layers: ``L``.
        V: reference visual-token count.

    Returns:
        int64 ``[L]``: ``k_0 = V``, ``k_l = round_half_up(r(l)·V)`` clipped to ``[0, V]``, made
        non-increasing.

    Example:
        >>> psigmoid_counts(2.0, 10.0, 0.25, 5, 8).tolist()
        [8, 8, 5, 2, 2]
    """
    return _counts(np.array([midpoint, steepness, floor]), int(num_layers), int(V))[0]


class _Scorer:
    """Evaluates parameter rows and remembers the best feasible schedule seen."""

    def __init__(self, table: np.ndarray, cost: np.ndarray, budget: float, probes: np.ndarray | None = None) -> None:
        self.L, n = table.shape
        self.V = n - 1
        self.rows = np.arange(self.L)
        self.finite = np.isfinite(table)
        self.table = np.where(self.finite, table, 0.0)
        self.cost = cost
        self.probes = probes
        self.budget = budget
        worst = np.max(np.where(self.finite, table, -np.inf), axis=1)
        self.ceiling = float(np.sum(np.maximum(worst, 0.0))) + 1.0  # above every feasible objective
        self.best: tuple[float, float, np.ndarray, np.ndarray] | None = None

    def __call__(self, params: np.ndarray) -> np.ndarray:
        """Penalised objectives of parameter rows ``[n, 3]`` (or one row ``[3]``)."""
        p = np.atleast_2d(params)
        k = _counts(p, self.L, self.V)
        objective = np.sum(self.table[self.rows, k], axis=1)
        flops = schedule_flops(self.cost, k, self.probes)  # every layer the count falls at pays a probe
        allowed = np.all(self.finite[self.rows, k], axis=1)
        feasible = allowed & (flops <= self.budget)
        for i in np.flatnonzero(feasible):
            key = (float(objective[i]), float(flops[i]))
            if self.best is None or key < self.best[:2]:
                self.best = (key[0], key[1], k[i].copy(), p[i].copy())
        excess = np.maximum(flops - self.budget, 0.0) / self.budget
        score = np.where(feasible, objective, self.ceiling * (1.0 + excess) + np.where(allowed, 0.0, self.ceiling))
        return score if np.ndim(params) == 2 else score[0]


def psigmoid_fit(table: Any, cost: Any, budget_flops: float, probes: Any = None) -> PSigmoidFit:
    """Fit the P-Sigmoid parameters: least divergence within the FLOPs budget.

    Args:
        table: float ``[L, V + 1]``, divergence of keeping ``k`` visual tokens entering layer
            ``l`` (``+inf`` marks forbidden entries), e.g. from
            :func:`recipe_compiler.divergence.divergence_table`.
        cost: float ``[L, V + 1]``, FLOPs of layer ``l`` with ``k`` visual tokens, e.g. from
            :func:`recipe_compiler.flops.cost_table`.
        budget_flops: allowed total ``Σ_l cost[l, k_l]`` plus the probes of the cuts.
        probes: float ``[L, V + 1]`` or None: a cut into ``l`` from ``x`` tokens costs
            ``probes[l, x]``. A smooth schedule falls at many layers, and pays a probe at each.

    Returns:
        The :class:`PSigmoidFit` of the best feasible schedule found.

    Raises:
        BudgetError: the budget is not positive, or no P-Sigmoid schedule evaluated fits it.
        ValueError: malformed table or cost.

    Example:
        >>> import numpy as np
        >>> table = np.array([[np.inf, np.inf, 0.0], [2.0, 0.5, 0.0], [1.0, 0.2, 0.0]])
        >>> cost = np.tile([1.0, 2.0, 3.0], (3, 1))
        >>> fit = psigmoid_fit(table, cost, budget_flops=7.0)
        >>> fit.schedule.tolist(), fit.objective <= 1.0, fit.flops <= 7.0
        ([2, 1, 1], True, True)
    """
    t, c, budget = _check_inputs(table, cost, budget_flops)
    scorer = _Scorer(t, c, budget, _check_probes(probes, t.shape))
    L = scorer.L
    m_lo, m_hi = midpoint_bounds(L)
    if L == 1:  # nothing to shape: the only schedule keeps everything
        scorer(np.array([[0.0, STEEPNESS_BOUNDS[1], FLOOR_BOUNDS[1]]]))
    else:
        grid = np.stack(
            np.meshgrid(
                np.linspace(m_lo, m_hi, _GRID),
                np.clip(np.geomspace(*STEEPNESS_BOUNDS, _GRID), *STEEPNESS_BOUNDS),
                np.linspace(*FLOOR_BOUNDS, _GRID),
                indexing="ij",
            ),
            axis=-1,
        ).reshape(-1, 3)
        start = grid[int(np.argmin(scorer(grid)))]  # first minimum: deterministic
        bounds = np.array([(m_lo, m_hi), STEEPNESS_BOUNDS, FLOOR_BOUNDS])
        inset = 1e-9 * (bounds[:, 1] - bounds[:, 0])  # scipy rescales x0 and rejects rounding past a bound
        start = np.clip(start, bounds[:, 0] + inset, bounds[:, 1] - inset)
        differential_evolution(
            lambda population: scorer(population.T),  # vectorized: columns are candidates
            bounds=[tuple(b) for b in bounds],
            x0=start,
            seed=_SEED,
            maxiter=_MAXITER,
            popsize=_POPSIZE,
            polish=False,
            tol=0.0,
            atol=0.0,
            updating="deferred",
            vectorized=True,
            workers=1,
        )
    if scorer.best is None:
        least = schedule_flops(c, _counts(np.array([m_lo, STEEPNESS_BOUNDS[1], 0.0]), L, scorer.V)[0], scorer.probes)
        raise BudgetError(
            f"budget of {budget:.6g} FLOPs cannot be met by psigmoid; its steepest schedule needs "
            f"{least:.6g} FLOPs: raise the budget"
        )
    objective, flops, k, p = scorer.best
    return PSigmoidFit(
        midpoint=float(p[0]),
        steepness=float(p[1]),
        floor=float(p[2]),
        schedule=k.astype(np.int64),
        objective=objective,
        flops=flops,
    )


@register_search("psigmoid", provenance="sigmoid-fit")
def psigmoid_schedule(table: Any, cost: Any, budget_flops: float, probes: Any = None) -> np.ndarray:
    """P-Sigmoid schedule: :func:`psigmoid_fit`'s keep counts.

    Args:
        table: float ``[L, V + 1]`` divergence table.
        cost: float ``[L, V + 1]`` FLOPs table.
        budget_flops: allowed total ``Σ_l cost[l, k_l]`` plus the probes of the cuts.
        probes: as :func:`psigmoid_fit`.

    Returns:
        int64 ``[L]`` keep counts with ``k_0 = V``, non-increasing, within the budget.

    Raises:
        BudgetError: as :func:`psigmoid_fit`.

    Example:
        >>> import numpy as np
        >>> table = np.array([[np.inf, np.inf, 0.0], [2.0, 0.5, 0.0], [1.0, 0.2, 0.0]])
        >>> cost = np.tile([1.0, 2.0, 3.0], (3, 1))
        >>> psigmoid_schedule(table, cost, budget_flops=9.0).tolist()
        [2, 2, 2]
    """
    return psigmoid_fit(table, cost, budget_flops, probes).schedule

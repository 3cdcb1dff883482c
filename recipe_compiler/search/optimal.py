"""``--search optimal``: the least-divergence non-increasing schedule within a FLOPs budget.

Pure numpy/scipy. Problem (METHODS.md §2): given ``table[l, k]`` (divergence of keeping ``k``
visual tokens entering layer ``l``), ``cost[l, k]`` (its FLOPs) and optionally ``probes[l, x]``
(the FLOPs of the scorer's probe for a cut into layer ``l`` from ``x`` tokens), find integers
``V = k_0 >= k_1 >= … >= k_{L-1} >= 0`` minimising ``Σ_l table[l, k_l]`` subject to
``Σ_l cost[l, k_l] + Σ_{l: k_l < k_{l-1}} probes[l, k_{l-1}] <= budget``.

The probe is a transition cost: it depends on the count before the cut and is paid only where
the count falls. Every step below handles it exactly: the DP's recursion takes the better of
"no cut" (``k_{l-1} = k``, free) and "cut from some ``x > k``" (``f(x) + probes[l, x]``), still
one suffix minimum per layer; the greedy moves price a layer's change with the probes of both
transitions it touches; the branch and bound adds the probe of each cut on its path and bounds
with value-to-go tables that include them.

Method:

1. Lagrangian relaxation: for a multiplier ``λ``, minimise ``Σ_l table + λ·cost`` exactly by
   dynamic programming over the token-count grid (running suffix minimum: ``O(L·V)``).
2. ``scipy.optimize.brentq`` on ``λ`` finds the step of the (non-increasing, piecewise constant)
   cost curve that crosses the budget; the Lagrangian optima on both sides of the step are kept.
3. The duality gap is closed greedily: from the feasible side, raise single layers
   (``k_l → x <= k_{l-1}``) by the best objective decrease per FLOP that still fits; from the
   infeasible side, lower single layers by the least objective increase per FLOP saved until the
   budget is met, then raise again. The better schedule wins.
4. Exactness: a depth-first branch and bound over schedules, pruned by three lower bounds (the
   Lagrangian value-to-go at the crossing ``λ``, the unconstrained divergence-to-go and the least
   FLOPs-to-go), proves the greedy result optimal or replaces it by a better one. It stops after a
   fixed number of node expansions (then the result is the best found: never worse than step 3);
   on small grids and on the usual smooth tables it finishes, so the result is the exact optimum.

Deterministic: no randomness; ties prefer keeping more tokens.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import brentq

from recipe_compiler.errors import BudgetError
from recipe_compiler.search.base import register_search

__all__ = ["optimal_schedule"]

_MAX_NODES = 50_000  # branch-and-bound expansions before settling for the best found
_REL_EPS = 1e-12


def _prefer_larger_argmin(values: np.ndarray) -> int:
    """Index of the minimum, the largest index among ties."""
    n = values.shape[0]
    return n - 1 - int(np.argmin(values[::-1]))


def _last_argmax(values: np.ndarray) -> int:
    """Index of the maximum, the largest index among ties (raises: the biggest step)."""
    return values.shape[0] - 1 - int(np.argmax(values[::-1]))


def _suffix_min(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``m[k] = min_{k' >= k} f[k']`` and its argmin (largest ``k'`` among ties)."""
    n = f.shape[0]
    rev = f[::-1]
    run = np.minimum.accumulate(rev)
    new = np.empty(n, dtype=bool)
    new[0] = True
    new[1:] = rev[1:] < run[:-1]
    arg_rev = np.maximum.accumulate(np.where(new, np.arange(n), 0))
    return run[::-1], (n - 1 - arg_rev)[::-1]


def _prefix_min(f: np.ndarray) -> np.ndarray:
    """``m[x] = min_{x' <= x} f[x']``."""
    return np.minimum.accumulate(f)


def _dp(values: np.ndarray, trans: np.ndarray | None = None) -> np.ndarray:
    """Schedule minimising ``Σ_l values[l, k_l] + Σ_{cuts} trans[l, k_{l-1}]`` over ``V = k_0 >= k_1 >= …``
    (ties: more tokens)."""
    L, n = values.shape
    V = n - 1
    f = np.full(n, np.inf)
    f[V] = values[0, V]
    pred = np.zeros((L, n), dtype=np.int64)
    for l in range(1, L):
        if trans is None:
            best, arg = _suffix_min(f)
        else:
            # A cut into l from x > k pays trans[l, x]; staying at k is free. Ties: the larger predecessor.
            cut, cut_arg = _suffix_min(f + trans[l])
            cut = np.append(cut[1:], np.inf)
            cut_arg = np.append(cut_arg[1:], n - 1)
            take_cut = cut <= f
            best = np.where(take_cut, cut, f)
            arg = np.where(take_cut, cut_arg, np.arange(n))
        pred[l] = arg
        f = values[l] + best
    k = np.empty(L, dtype=np.int64)
    k[L - 1] = V if L == 1 else _prefer_larger_argmin(f)
    for l in range(L - 1, 0, -1):
        k[l - 1] = pred[l, k[l]]
    return k


class _Problem:
    """The instance, with helpers that evaluate schedules exactly (canonical sums)."""

    def __init__(self, table: np.ndarray, cost: np.ndarray, budget: float, probes: np.ndarray | None = None) -> None:
        self.table = table
        self.cost = cost
        self.budget = budget
        self.L, n = table.shape
        self.V = n - 1
        self.rows = np.arange(self.L)
        self.finite = np.isfinite(table)
        self.probes = probes  # None: cuts are free

    def objective(self, k: np.ndarray) -> float:
        return float(np.sum(self.table[self.rows, k]))

    def flops(self, k: np.ndarray) -> float:
        total = float(np.sum(self.cost[self.rows, k]))
        if self.probes is not None:
            cuts = np.nonzero(k[1:] < k[:-1])[0] + 1
            total += float(np.sum(self.probes[cuts, k[cuts - 1]]))
        return total

    def layer_costs(self, k: np.ndarray, l: int) -> np.ndarray:
        """FLOPs that depend on ``k_l``, for every value ``x`` of it (the others fixed): the layer's
        own cost plus the probes of the cut into ``l`` and the cut out of it."""
        out = self.cost[l].copy()
        if self.probes is None:
            return out
        x = np.arange(self.V + 1)
        if l > 0:
            out += np.where(x < k[l - 1], self.probes[l, k[l - 1]], 0.0)
        if l + 1 < self.L:
            out += np.where(k[l + 1] < x, self.probes[l + 1], 0.0)
        return out

    def move_costs(self, k: np.ndarray) -> np.ndarray:
        """``[L, V + 1]``: :meth:`layer_costs` of every layer (row ``l`` for ``k_l = x``)."""
        if self.probes is None:
            return self.cost
        x = np.arange(self.V + 1)[None, :]
        out = self.cost.copy()
        prev = np.concatenate(([self.V], k[:-1]))[:, None]
        into = np.where(x < prev, self.probes[self.rows[:, None], prev], 0.0)
        into[0] = 0.0
        nxt = np.concatenate((k[1:], [0]))[:, None]
        out_of = np.where(nxt < x, np.concatenate((self.probes[1:], np.zeros((1, self.V + 1)))), 0.0)
        return out + into + out_of

    def feasible(self, k: np.ndarray) -> bool:
        return self.flops(k) <= self.budget and np.isfinite(self.objective(k))


def _raise_greedily(p: _Problem, k: np.ndarray) -> np.ndarray:
    """Spend the slack: repeatedly apply the single-layer raise ``k_l → x`` (``x <= k_{l-1}``)
    with the largest divergence decrease per FLOP among those that fit; stop when none fits.

    Each layer's best move is cached and recomputed only when it can have changed (its own or
    the previous layer's count moved, or its best no longer fits the shrinking slack).
    """
    k = k.copy()
    L = p.L
    free = np.zeros(L, dtype=bool)  # a raise that costs nothing: taken first, by gain
    val = np.full(L, -np.inf)  # gain (free moves) or gain per FLOP
    best_x = np.zeros(L, dtype=np.int64)
    extra_of = np.full(L, np.inf)
    valid = np.zeros(L, dtype=bool)

    def refresh(l: int, slack: float) -> None:
        valid[l] = False
        if l == 0:
            return
        lo, hi = int(k[l]) + 1, int(k[l - 1])
        if hi < lo:
            return
        row = p.layer_costs(k, l)
        cur_t, cur_c = p.table[l, k[l]], row[k[l]]
        gain = cur_t - p.table[l, lo : hi + 1]
        extra = row[lo : hi + 1] - cur_c
        ok = p.finite[l, lo : hi + 1] & (gain > 0) & (extra <= slack)
        if not ok.any():
            return
        zero = ok & (extra <= 0)
        if zero.any():
            i = _last_argmax(np.where(zero, gain, -np.inf))
            free[l] = True
            val[l] = gain[i]
        else:
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                i = _last_argmax(np.where(ok, gain / extra, -np.inf))
            free[l] = False
            val[l] = gain[i] / extra[i]
        best_x[l], extra_of[l], valid[l] = lo + i, extra[i], True

    slack = p.budget - p.flops(k)
    for l in range(L):
        refresh(l, slack)
    for _ in range(L * (p.V + 1)):
        if not valid.any():
            break
        pool = valid & free if (valid & free).any() else valid
        l = int(np.argmax(np.where(pool, val, -np.inf)))
        k[l] = best_x[l]
        slack = p.budget - p.flops(k)
        stale = set(np.nonzero(valid & (extra_of > slack))[0].tolist()) | {l, l + 1}
        if p.probes is not None and l > 0:
            stale.add(l - 1)  # the cut out of layer l - 1 changed with k_l
        for j in sorted(stale):
            if j < L:
                refresh(j, slack)
    return k


def _repair(p: _Problem, k: np.ndarray, one_step: bool) -> np.ndarray | None:
    """Lower single layers until the budget is met: the least divergence increase per FLOP saved
    (``one_step``: if one lowering suffices, the cheapest such one)."""
    k = k.copy()
    cols = np.arange(p.V + 1)[None, :]
    for _ in range(p.L * (p.V + 1)):
        excess = p.flops(k) - p.budget
        if excess <= 0:
            return k
        moves = p.move_costs(k)
        cur_t = p.table[p.rows, k][:, None]
        cur_c = moves[p.rows, k][:, None]
        lower = np.concatenate((k[1:], [0]))[:, None]  # x >= k_{l+1}
        with np.errstate(invalid="ignore", over="ignore"):
            loss = p.table - cur_t
            saved = cur_c - moves
        ok = (cols < k[:, None]) & (cols >= lower) & p.finite & (saved > 0)
        ok[0] = False
        if not ok.any():
            return None
        enough = ok & (saved >= excess)
        if one_step and enough.any():
            score = np.where(enough, loss, np.inf)
        else:
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                score = np.where(ok, loss / saved, np.inf)
        l, x = np.unravel_index(int(np.argmin(score)), score.shape)
        k[l] = x
    return None


def _to_go(values: np.ndarray, trans: np.ndarray | None = None) -> np.ndarray:
    """``G[l, x]`` = least ``Σ_{l' >= l} values[l', k_{l'}]`` (plus ``trans[l', k_{l'-1}]`` for each cut
    after ``l``) with ``k_l = x`` and non-increasing."""
    L = values.shape[0]
    g = np.empty_like(values)
    g[L - 1] = values[L - 1]
    for l in range(L - 2, -1, -1):
        if trans is None:
            g[l] = values[l] + _prefix_min(g[l + 1])
        else:
            below = np.concatenate(([np.inf], _prefix_min(g[l + 1])[:-1]))  # min over y < x
            g[l] = values[l] + np.minimum(g[l + 1], below + trans[l + 1])
    return g


def _branch_and_bound(p: _Problem, lam: float, best_k: np.ndarray) -> np.ndarray:
    """Exact search for a feasible schedule better than ``best_k`` (bounded by ``_MAX_NODES``)."""
    if p.L == 1:
        return best_k
    t, c = np.where(p.finite, p.table, np.inf), p.cost
    probes = p.probes if p.probes is not None else np.zeros_like(c)
    obj_to_go = _to_go(t)
    cost_to_go = _to_go(np.where(p.finite, c, np.inf), probes)
    lag = t + lam * c
    lag_to_go = _to_go(lag, lam * probes)
    best_obj = p.objective(best_k)
    budget = p.budget
    slack_tol = _REL_EPS * max(1.0, abs(budget))

    V = p.V
    stack: list[tuple[int, int, float, float, tuple[int, ...]]] = [
        (0, V, float(t[0, V]), float(c[0, V]), (V,))
    ]
    nodes = 0
    while stack and nodes < _MAX_NODES:
        l, x_prev, acc_t, acc_c, path = stack.pop()
        nodes += 1
        nxt = l + 1
        xs = np.arange(x_prev + 1)
        step_c = c[nxt, : x_prev + 1] + np.where(xs < x_prev, probes[nxt, x_prev], 0.0)  # a cut pays its probe
        eps = _REL_EPS * max(1.0, abs(best_obj))
        if nxt == p.L - 1:  # children are complete schedules
            objs = acc_t + t[nxt, : x_prev + 1]
            flops = acc_c + step_c
            ok = (flops <= budget + slack_tol) & (objs < best_obj - eps)
            for x in xs[ok][np.argsort(objs[ok], kind="stable")]:
                cand = np.array(path + (int(x),), dtype=np.int64)
                if p.feasible(cand) and p.objective(cand) < best_obj - eps:
                    best_k, best_obj = cand, p.objective(cand)
                    break
            continue
        cut_c = step_c - c[nxt, : x_prev + 1]
        bound_t = acc_t + obj_to_go[nxt, : x_prev + 1]
        bound_c = acc_c + cut_c + cost_to_go[nxt, : x_prev + 1]
        bound_lag = acc_t + lam * (acc_c + cut_c) + lag_to_go[nxt, : x_prev + 1]
        ok = (
            (bound_c <= budget + slack_tol)
            & (bound_t < best_obj - eps)
            & (bound_lag < best_obj + lam * budget - eps)
        )
        if not ok.any():
            continue
        cand_x = xs[ok]
        order = np.argsort(bound_lag[ok], kind="stable")[::-1]  # most promising popped first
        for x in cand_x[order]:
            stack.append((nxt, int(x), acc_t + float(t[nxt, x]), acc_c + float(step_c[x]), path + (int(x),)))
    return best_k


def _check_inputs(table: Any, cost: Any, budget_flops: Any) -> tuple[np.ndarray, np.ndarray, float]:
    t = np.asarray(table, dtype=np.float64)
    c = np.asarray(cost, dtype=np.float64)
    if t.ndim != 2 or t.shape[0] < 1 or t.shape[1] < 1:
        raise ValueError(f"table must have shape [num_layers, V + 1] with both >= 1, got {t.shape}")
    if c.shape != t.shape:
        raise ValueError(f"cost has shape {c.shape}; it must match the table's {t.shape}")
    if np.isnan(t).any() or np.isneginf(t).any():
        raise ValueError("table holds NaN or -inf; divergences must be numbers or +inf (forbidden)")
    if not np.all(np.isfinite(c)):
        raise ValueError("cost holds non-finite values; every (layer, count) needs a FLOPs figure")
    if not np.isfinite(t[0, -1]):
        raise ValueError("table[0, V] is not finite; layer 0 must be allowed to keep every visual token")
    try:
        b = float(budget_flops)
    except (TypeError, ValueError):
        raise BudgetError(f"budget_flops={budget_flops!r} is not a number; pass the allowed mean FLOPs") from None
    if not np.isfinite(b) or b <= 0:
        raise BudgetError(f"budget_flops={budget_flops!r} is invalid; pass a positive, finite FLOPs figure")
    return t, c, b


def _check_probes(probes: Any, shape: tuple) -> np.ndarray | None:
    if probes is None:
        return None
    p = np.asarray(probes, dtype=np.float64)
    if p.shape != shape:
        raise ValueError(f"probes has shape {p.shape}; it must match the table's {shape}")
    if not np.all(np.isfinite(p)) or np.any(p < 0):
        raise ValueError("probes must hold finite, non-negative FLOPs for every (layer, count before the cut)")
    return None if not np.any(p) else p


@register_search("optimal", provenance="lagrangian-dp")
def optimal_schedule(table: Any, cost: Any, budget_flops: float, probes: Any = None) -> np.ndarray:
    """The least-divergence non-increasing schedule whose FLOPs fit the budget.

    Args:
        table: float ``[L, V + 1]``, divergence of keeping ``k`` visual tokens entering layer
            ``l`` (``+inf`` marks forbidden entries), e.g. from
            :func:`recipe_compiler.divergence.divergence_table`.
        cost: float ``[L, V + 1]``, FLOPs of layer ``l`` with ``k`` visual tokens, e.g. from
            :func:`recipe_compiler.flops.cost_table`.
        budget_flops: allowed total ``Σ_l cost[l, k_l]`` (plus the probes of the cuts).
        probes: float ``[L, V + 1]`` or None, FLOPs of the scorer's probe for a cut into layer
            ``l`` from ``x`` tokens (:func:`recipe_compiler.flops.probe_table`); None: cuts are free.

    Returns:
        int64 ``[L]`` keep counts with ``k_0 = V``, non-increasing, within the budget.

    Raises:
        BudgetError: the budget is not positive, or below the cheapest admissible schedule (the
            message gives that schedule's FLOPs).

    Example:
        >>> import numpy as np
        >>> table = np.array([[np.inf, np.inf, 0.0], [2.0, 0.5, 0.0], [1.0, 0.2, 0.0]])
        >>> cost = np.tile([1.0, 2.0, 3.0], (3, 1))
        >>> optimal_schedule(table, cost, budget_flops=6.0).tolist()
        [2, 1, 0]
    """
    t, c, budget = _check_inputs(table, cost, budget_flops)
    trans = _check_probes(probes, t.shape)
    p = _Problem(t, c, budget, trans)
    V = p.V

    # Cheapest admissible schedule (forbidden entries excluded): below it nothing is feasible.
    cheapest = _dp(np.where(p.finite, c, np.inf), trans)
    if not np.isfinite(p.objective(cheapest)) or p.flops(cheapest) > budget:
        min_flops = p.flops(cheapest)
        raise BudgetError(
            f"budget of {budget:.6g} FLOPs cannot be met; the smallest feasible is {min_flops:.6g} FLOPs "
            f"(keep {V} visual tokens in layer 0, then as few as allowed): raise the budget"
        )

    # λ = 0: the unconstrained optimum (keep everything, for a divergence table) if it fits.
    free = _dp(t)
    if p.feasible(free):
        return free

    scale = max(float(np.max(np.abs(c))), 1.0)
    evaluated: dict[float, np.ndarray] = {}

    def schedule_at(lam: float) -> np.ndarray:
        if lam not in evaluated:
            evaluated[lam] = _dp(t + (lam / scale) * c, None if trans is None else (lam / scale) * trans)
        return evaluated[lam]

    def excess(lam: float) -> float:
        return p.flops(schedule_at(lam)) - budget

    lam_hi = 1.0
    while excess(lam_hi) > 0 and lam_hi < 1e300:
        lam_hi *= 2.0
    if excess(lam_hi) > 0:  # numerically unreachable by the relaxation: start from the cheapest
        candidates = [cheapest]
        lam_star = lam_hi
    else:
        lam_star = brentq(excess, 0.0, lam_hi, xtol=1e-12 * lam_hi, rtol=1e-12, maxiter=500)
        feas = {lam: k for lam, k in evaluated.items() if p.feasible(k)}
        infeas = {lam: k for lam, k in evaluated.items() if not p.feasible(k)}
        candidates = [feas[min(feas)]]  # the feasible side of the crossing
        if infeas:
            candidates.append(infeas[max(infeas)])  # its infeasible neighbour

    finals: list[np.ndarray] = []
    for k in candidates:
        if p.feasible(k):
            finals.append(_raise_greedily(p, k))
        else:
            for one_step in (False, True):
                fixed = _repair(p, k, one_step)
                if fixed is not None and p.feasible(fixed):
                    finals.append(_raise_greedily(p, fixed))
    best = min(finals, key=lambda k: (p.objective(k), p.flops(k), tuple(-k)))
    best = _branch_and_bound(p, lam_star / scale, best)
    return best.astype(np.int64)

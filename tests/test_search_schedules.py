"""``--search gsearch`` / ``psigmoid`` / ``optimal``: one contract, and optimal is never beaten."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recipe_compiler.divergence import divergence_table, schedule_objective
from recipe_compiler.errors import BudgetError
from recipe_compiler.flops import LMShape, cost_table
from recipe_compiler.search import TABLE_SEARCHES as SEARCHES
from recipe_compiler.search.gsearch import gsearch_greedy, gsearch_schedule
from recipe_compiler.search.optimal import optimal_schedule
from recipe_compiler.search.psigmoid import (
    FLOOR_BOUNDS,
    STEEPNESS_BOUNDS,
    midpoint_bounds,
    psigmoid_counts,
    psigmoid_fit,
    psigmoid_schedule,
)
from recipe_compiler.statistics import Statistics

INF = math.inf
NAMES = sorted(SEARCHES)


def check_valid(k: np.ndarray, table: np.ndarray, cost: np.ndarray, budget: float) -> None:
    L, V = table.shape[0], table.shape[1] - 1
    assert isinstance(k, np.ndarray) and k.dtype == np.int64 and k.shape == (L,)
    assert k[0] == V
    assert np.all(np.diff(k) <= 0), k
    assert np.all(k >= 0)
    assert float(np.sum(cost[np.arange(L), k])) <= budget
    assert np.isfinite(schedule_objective(table, k))


def flops(cost: np.ndarray, k: np.ndarray) -> float:
    return float(np.sum(cost[np.arange(cost.shape[0]), k]))


def cheapest_budget(cost: np.ndarray) -> float:
    """FLOPs of (V, 0, …, 0): the cheapest schedule when cost rows increase in k.

    Summed exactly as ``check_valid`` sums a schedule, so a budget at this value is feasible
    to the last bit (another summation order can land one ulp below it).
    """
    cheapest = np.zeros(cost.shape[0], dtype=np.int64)
    cheapest[0] = cost.shape[1] - 1
    return float(np.sum(cost[np.arange(cost.shape[0]), cheapest]))


def budget_between(cost: np.ndarray, fraction: float) -> float:
    least = cheapest_budget(cost)
    return float(least + fraction * (cost[:, -1].sum() - least))


TINY_LM = LMShape(num_layers=6, hidden=64, intermediate=176, num_heads=4, num_kv_heads=2, head_dim=16)


def stats_problem(seed: int, V: int = 24):
    """A real divergence table and cost table from Dirichlet statistics (ragged visual counts)."""
    rng = np.random.default_rng(seed)
    S, L = 4, TINY_LM.num_layers
    n_visual = rng.integers(V // 2, V + 1, S)
    n_visual[0] = V
    arrays = []
    for _ in range(3):
        a = rng.dirichlet(np.full(V, 0.3), size=(S, L)).astype(np.float32)
        a[np.broadcast_to(np.arange(V)[None, None, :] >= n_visual[:, None, None], a.shape)] = np.nan
        arrays.append(a)
    n_text = rng.integers(5, 30, S)
    stats = Statistics(*arrays, n_visual, n_text, n_visual + n_text + 20)
    return divergence_table(stats, "fitprune"), cost_table(TINY_LM, stats.n_other, stats.n_visual, V)


HAND_TABLE = np.array([[INF, INF, 0.0], [2.0, 0.5, 0.0], [1.0, 0.2, 0.0]])
HAND_COST = np.tile([1.0, 2.0, 3.0], (3, 1))
GAP_TABLE = np.array([[INF, INF, INF, 0.0], [2.0, 2.0, 2.0, 0.0], [4.0, 3.0, 3.0, 0.0]])
GAP_COST = np.tile([1.0, 2.0, 3.0, 4.0], (3, 1))

# (name, table, cost, budget, expected schedule per search)
CASES = [
    ("hand-5", HAND_TABLE, HAND_COST, 5.0, {"optimal": [2, 0, 0], "gsearch": [2, 0, 0], "psigmoid": [2, 0, 0]}),
    ("hand-6", HAND_TABLE, HAND_COST, 6.0, {"optimal": [2, 1, 0], "gsearch": [2, 1, 0], "psigmoid": [2, 1, 0]}),
    ("hand-7", HAND_TABLE, HAND_COST, 7.0, {"optimal": [2, 1, 1], "gsearch": [2, 1, 1], "psigmoid": [2, 1, 1]}),
    ("hand-9", HAND_TABLE, HAND_COST, 9.0, {"optimal": [2, 2, 2], "gsearch": [2, 2, 2], "psigmoid": [2, 2, 2]}),
    # Greedy is myopic: pruning layer 1 to 0 at ε = 2 forces layer 2 to 0 (divergence 4).
    ("gap-8", GAP_TABLE, GAP_COST, 8.0, {"optimal": [3, 1, 1], "gsearch": [3, 0, 0]}),
]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hand_tables(case, name):
    _, table, cost, budget, expected = case
    k = SEARCHES[name](table, cost, budget)
    check_valid(k, table, cost, budget)
    if name in expected:
        assert k.tolist() == expected[name]
    assert schedule_objective(table, SEARCHES["optimal"](table, cost, budget)) <= schedule_objective(table, k)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("budget", [4.99, 0.0, -1.0, float("nan"), float("inf"), "lots"])
def test_infeasible_or_invalid_budget_raises_budget_error(name, budget):
    with pytest.raises(BudgetError, match="budget"):
        SEARCHES[name](HAND_TABLE, HAND_COST, budget)


@pytest.mark.parametrize("name", NAMES)
def test_malformed_tables_are_value_errors(name):
    with pytest.raises(ValueError, match="must match"):
        SEARCHES[name](np.zeros((3, 4)), np.zeros((3, 5)), 1.0)
    bad = np.zeros((3, 4))
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        SEARCHES[name](bad, np.ones((3, 4)), 10.0)


@pytest.mark.parametrize("name", NAMES)
def test_single_layer_keeps_everything(name):
    table, cost = np.array([[INF, 0.0]]), np.array([[1.0, 2.0]])
    assert SEARCHES[name](table, cost, 2.0).tolist() == [1]
    with pytest.raises(BudgetError):
        SEARCHES[name](table, cost, 1.5)


def test_registry():
    assert SEARCHES == {"optimal": optimal_schedule, "gsearch": gsearch_schedule, "psigmoid": psigmoid_schedule}


# --- G-Search ---


def reference_greedy(table: np.ndarray, eps: float) -> list[int]:
    L, V = table.shape[0], table.shape[1] - 1
    k = [V]
    for i in range(1, L):
        choice = k[-1]
        for x in range(k[-1] + 1):  # smallest first
            if math.isfinite(table[i, x]) and table[i, x] <= eps:
                choice = x
                break
        k.append(choice)
    return k


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("fraction", [0.05, 0.3, 0.7])
def test_gsearch_is_the_greedy_at_the_smallest_feasible_tolerance(seed, fraction):
    table, cost = stats_problem(seed)
    budget = budget_between(cost, fraction)
    k = gsearch_schedule(table, cost, budget)
    check_valid(k, table, cost, budget)
    candidates = np.unique(table[1:][np.isfinite(table[1:])])
    feasible = [e for e in candidates if flops(cost, np.array(reference_greedy(table, e))) <= budget]
    assert feasible, "the loosest tolerance reaches the cheapest schedule"
    assert k.tolist() == reference_greedy(table, feasible[0])
    for e in candidates[:: max(1, len(candidates) // 25)]:
        assert gsearch_greedy(table, e).tolist() == reference_greedy(table, e)


def test_gsearch_tolerance_is_monotone():
    table, _ = stats_problem(5)
    previous = None
    for eps in np.linspace(0.0, float(np.max(table[1:])), 40):
        k = gsearch_greedy(table, eps)
        if previous is not None:
            assert np.all(k <= previous)
        previous = k


def test_gsearch_with_decreasing_cost_rows_scans_the_tolerances():
    # Layer 1 is cheaper with 2 tokens than with 1: FLOPs are not monotone in ε.
    table = np.array([[INF, INF, 0.0], [1.0, 0.5, 0.0], [1.0, 0.5, 0.0]])
    cost = np.array([[0.0, 0.0, 1.0], [5.0, 9.0, 1.0], [0.0, 1.0, 2.0]])
    budget = 4.0
    k = gsearch_schedule(table, cost, budget)
    check_valid(k, table, cost, budget)
    assert k.tolist() == [2, 2, 2]


# --- P-Sigmoid ---


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("fraction", [0.05, 0.4, 0.8])
def test_psigmoid_parameters_stay_in_bounds_and_generate_the_schedule(seed, fraction):
    table, cost = stats_problem(seed)
    L, V = table.shape[0], table.shape[1] - 1
    budget = budget_between(cost, fraction)
    fit = psigmoid_fit(table, cost, budget)
    lo, hi = midpoint_bounds(L)
    assert lo <= fit.midpoint <= hi
    assert STEEPNESS_BOUNDS[0] <= fit.steepness <= STEEPNESS_BOUNDS[1]
    assert FLOOR_BOUNDS[0] <= fit.floor <= FLOOR_BOUNDS[1]
    check_valid(fit.schedule, table, cost, budget)
    assert fit.schedule.tolist() == psigmoid_counts(fit.midpoint, fit.steepness, fit.floor, L, V).tolist()
    assert fit.objective == pytest.approx(schedule_objective(table, fit.schedule), rel=1e-12)
    assert fit.flops == pytest.approx(flops(cost, fit.schedule), rel=1e-12)
    assert np.array_equal(psigmoid_schedule(table, cost, budget), fit.schedule)


def test_psigmoid_counts_follow_the_formula():
    m, s, b, L, V = 3.0, 1.5, 0.2, 8, 100
    expected = [V] + [
        min(V, math.floor((b + (1 - b) / (1 + math.exp(s * (l - m)))) * V + 0.5)) for l in range(1, L)
    ]
    assert psigmoid_counts(m, s, b, L, V).tolist() == expected
    assert psigmoid_counts(0.0, 10.0, 0.0, 5, 576).tolist() == [576, 0, 0, 0, 0]  # the step
    assert psigmoid_counts(2.0, 1.0, 1.0, 5, 576).tolist() == [576] * 5  # floor 1 keeps everything


# --- all searches on statistics, and the property ---


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.35, 0.65, 1.0])
def test_on_statistics_optimal_is_never_beaten(seed, fraction):
    table, cost = stats_problem(seed)
    budget = budget_between(cost, fraction)
    results = {name: SEARCHES[name](table, cost, budget) for name in NAMES}
    for k in results.values():
        check_valid(k, table, cost, budget)
    best = schedule_objective(table, results["optimal"])
    for name in ("gsearch", "psigmoid"):
        assert best <= schedule_objective(table, results[name]) + 1e-12, name


@st.composite
def statistics_like(draw):
    """Rows non-increasing in k down to 0 at V (row 0 forbids pruning); cost rows increasing."""
    L = draw(st.integers(1, 5), label="L")
    V = draw(st.integers(1, 8), label="V")
    seed = draw(st.integers(0, 2**32 - 1), label="seed")
    rng = np.random.default_rng(seed)
    steps = rng.random((L, V)) ** rng.uniform(0.3, 4.0)  # lost mass per dropped rank, long-tailed
    table = np.zeros((L, V + 1))
    table[:, :V] = np.cumsum(steps[:, ::-1], axis=1)[:, ::-1] * rng.uniform(0.1, 3.0, (L, 1))
    if draw(st.booleans(), label="ties"):
        table = np.round(table)
    table[0, :V] = INF
    per_token = rng.uniform(1.0, 3.0, (L, 1)) if draw(st.booleans(), label="ragged") else np.ones((L, 1))
    cost = rng.uniform(5.0, 20.0, (L, 1)) + per_token * np.arange(V + 1)[None, :] * rng.uniform(0.8, 1.2)
    fraction = draw(st.floats(0.0, 1.0), label="fraction")
    return table, cost, budget_between(cost, fraction)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=statistics_like())
def test_property_every_search_meets_the_budget_and_optimal_is_least(problem):
    table, cost, budget = problem
    objectives = {}
    for name in NAMES:
        k = SEARCHES[name](table, cost, budget)
        check_valid(k, table, cost, budget)
        again = SEARCHES[name](table.copy(), cost.copy(), budget)
        assert np.array_equal(k, again), f"{name} is not deterministic"
        objectives[name] = schedule_objective(table, k)
    tol = 1e-9 * max(1.0, objectives["optimal"])
    assert objectives["optimal"] <= objectives["gsearch"] + tol
    assert objectives["optimal"] <= objectives["psigmoid"] + tol


# --- probe costs: every table search pays the scorer's probe at each cut ---


def stats_problem_with_probes(seed: int, scorer: str, V: int = 24):
    from recipe_compiler.flops import probe_table
    from runtime.methods.scorers import SCORERS

    rng = np.random.default_rng(seed)
    table, cost = stats_problem(seed, V)
    S = 4
    n_visual = rng.integers(V // 2, V + 1, S)
    n_visual[0] = V
    n_text = rng.integers(5, 30, S)
    probes = probe_table(TINY_LM, n_text + 20, n_visual, V, SCORERS[scorer].probe_macs, np.full(S, 20), n_text)
    return table, cost, probes


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("scorer", ["fitprune", "last-token"])
@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.8])
def test_every_search_meets_the_budget_with_the_probes_counted(name, scorer, fraction):
    from recipe_compiler.search.base import schedule_flops

    table, cost, probes = stats_problem_with_probes(1, scorer)
    budget = budget_between(cost, fraction) + float(probes[1, -1])  # the cheapest schedule's one cut fits
    k = SEARCHES[name](table, cost, budget, probes=probes)
    assert k[0] == table.shape[1] - 1 and np.all(np.diff(k) <= 0)
    with_probes = schedule_flops(cost, k, probes)
    assert with_probes <= budget, f"{name} spends {with_probes} > {budget} once its probes are counted"
    assert with_probes > schedule_flops(cost, k) or np.all(k == k[0]), "a schedule that cuts pays its probes"
    best = schedule_objective(table, SEARCHES["optimal"](table, cost, budget, probes=probes))
    assert best <= schedule_objective(table, k) + 1e-12


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("seed", [2, 3])
def test_expensive_probes_make_every_search_cut_less_often(name, seed):
    table, cost, probes = stats_problem_with_probes(seed, "fitprune")
    budget = budget_between(cost, 0.5)
    cuts = lambda k: int(np.sum(np.diff(k) < 0))  # noqa: E731
    free = SEARCHES[name](table, cost, budget)
    # Probes 10x dearer, and the budget raised by one of them: every extra cut now costs a lot.
    pricey = SEARCHES[name](table, cost, budget + 10 * float(probes[1, -1]), probes=10 * probes)
    assert cuts(pricey) <= cuts(free)
    if name != "gsearch":  # gsearch cuts wherever its tolerance allows; the others weigh each cut's cost
        assert cuts(free) > 1 and cuts(pricey) == 1, (free, pricey)

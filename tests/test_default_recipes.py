"""The recipes users get by default pay for every probe they run.

No recipe file is committed: the default recipes are the ones the quick start compiles
(``recipe-compile --model tiny-llava --budget 0.45``, default search and scorer) and the ones the
benchmarks compile (``bench/runtime.py``: the mid-size LLaVA, 8 calibration samples, budgets 0.45
and 0.25). Each pruning layer runs the scorer's probe; a cut that saved fewer FLOPs than its probe
costs (the issue's ``576→194→193→192``: its 193 → 192 cut saves 55 MFLOPs less than its probe
costs) would make the recipe
dearer than the same schedule without it. Here every cut of each of them saves more than the
whole price of its probe, and the verified FLOPs, probes included, are within the budget.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.append(str(Path(__file__).resolve().parents[1] / "bench"))  # after the packages: bench/runtime.py is a script

from recipe_compiler.calibration import load_calibration  # noqa: E402
from recipe_compiler.compile import BUDGET_RTOL, CompileConfig, compile_recipe, scorer_probes  # noqa: E402
from recipe_compiler.flops import LMShape, cost_table  # noqa: E402
from recipe_compiler.search.base import schedule_flops  # noqa: E402


def cut_savings(cost: np.ndarray, probes: np.ndarray, keep: np.ndarray) -> dict[int, float]:
    """layer -> FLOPs the cut into it saves: the schedule without it (the count before it held
    until the next cut) minus the schedule, probes included on both sides."""
    cuts = [int(l) for l in np.nonzero(np.diff(keep) < 0)[0] + 1]
    out = {}
    for i, layer in enumerate(cuts):
        end = cuts[i + 1] if i + 1 < len(cuts) else len(keep)
        without = keep.copy()
        without[layer:end] = keep[layer - 1]
        out[layer] = schedule_flops(cost, without, probes) - schedule_flops(cost, keep, probes)
    return out


def _check(result, shape, budget):
    stats, v_ref = result.statistics, int(result.recipe.reference_visual_tokens)
    keep = result.recipe.keep_count.astype(np.int64)
    cost = cost_table(shape, stats.n_other, stats.n_visual, v_ref)
    probes = scorer_probes(shape, stats, result.recipe.scorer, v_ref)
    savings = cut_savings(cost, probes, keep)
    assert savings, "a pruning recipe cuts somewhere"
    for layer, saved in savings.items():
        assert saved > 0, f"the cut into layer {layer} ({keep[layer - 1]} -> {keep[layer]}) saves {saved:.4g} FLOPs net of its probe"
    assert result.verification.flops_fraction <= budget * (1 + BUDGET_RTOL)
    return keep


def test_quick_start_recipes_pay_for_their_probes(tiny, calibration):
    full_set = load_calibration()  # the quick start's calibration set (all shipped samples)
    shape = LMShape.from_config(tiny.model.config.text_config)
    stats = None
    for budget in (0.45, 0.25):
        result = compile_recipe(tiny.model, tiny.processor, full_set, CompileConfig(budget), format_prompt=tiny.format_prompt,
                                statistics=stats)
        stats = result.statistics
        _check(result, shape, budget)


def test_benchmark_recipes_pay_for_their_probes():
    # The schedule the benchmark's compile_recipe(CompileConfig(budget)) searches, on the same statistics,
    # without its verification pass (the quick-start test above runs the whole compile).
    from common import spec_for

    from recipe_compiler.collect import collect_statistics
    from recipe_compiler.compile import cut_only_at
    from recipe_compiler.divergence import divergence_table
    from recipe_compiler.models import build_random
    from recipe_compiler.search import SEARCHES
    from runtime.families import family_for

    loaded = build_random(spec_for("mid"), device="cpu", dtype="float32")
    calibration = load_calibration(samples=8)
    stats = collect_statistics(loaded.model, loaded.processor, calibration, format_prompt=loaded.format_prompt)
    shape = LMShape.from_config(loaded.model.config.text_config)
    v_ref = 576
    cost = cost_table(shape, stats.n_other, stats.n_visual, v_ref)
    probes = scorer_probes(shape, stats, "fitprune", v_ref)
    table = divergence_table(stats, "fitprune", v_ref=v_ref)
    search = cut_only_at(SEARCHES["optimal"].schedule, family_for(loaded.model).cut_layers(loaded.model), shape.num_layers)
    for budget in (0.45, 0.25):
        budget_flops = budget * float(np.sum(cost[:, v_ref]))
        keep = search(table, cost, budget_flops, probes=probes)
        assert schedule_flops(cost, keep, probes) <= budget_flops
        savings = cut_savings(cost, probes, keep)
        assert savings and all(saved > 0 for saved in savings.values()), (keep.tolist(), savings)
        # Probes uncounted, 0.45 gave 576 → 194 → 193 → 192: its last cut (193 → 192 into layer 11) cost
        # 55 MFLOPs more than it saved (measured), and the schedule missed the budget once its probes ran.
        free = search(table, cost, budget_flops)
        assert schedule_flops(cost, free, probes) > budget_flops, "the probe-blind schedule is over budget once its probes run"
        assert int(np.sum(np.diff(keep) < 0)) <= 2, keep


@pytest.mark.parametrize("drop", [1, 40])
def test_cut_savings_sees_a_one_token_drop_that_does_not_pay(drop):
    # The check itself: a one-token drop whose probe costs more than a token saves is caught.
    cost = np.tile(np.arange(11, dtype=np.float64), (4, 1))  # one FLOP per token per layer
    probes = np.zeros((4, 11))
    probes[1:] = 5.0  # every cut's probe: 5 FLOPs
    keep = np.array([10, 10, 10, 10 - min(drop, 10)])
    saved = cut_savings(cost, probes, keep)[3]
    assert saved == min(drop, 10) - 5

"""A later cut that drops only a few tokens is folded into the cut before it.

Each cut costs the runtime fixed work FLOPs do not show (the probe's launch and softmax, top-k,
gathers, a mask rebuild: about 2 ms a cut on the mid LLaVA here), and the searches, which count
the probe's FLOPs only, used to end nearly every schedule with a one-token cut (576 → 191 → 190
at 0.45). What a user relies on: folding only lowers the FLOPs (the budget still holds), the first
cut is never touched, and a compiled recipe's later cuts each drop at least ``MIN_CUT_DROP`` of
the image.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from recipe_compiler.calibration import load_calibration
from recipe_compiler.compile import MIN_CUT_DROP, CompileConfig, compile_recipe, fold_small_cuts, scorer_probes
from recipe_compiler.flops import LMShape, cost_table
from recipe_compiler.search.base import schedule_flops

CASES = [
    # name, keep, min_drop, expected
    ("one-token tail cut", [576, 191, 191, 190, 190], 12, [576, 190, 190, 190, 190]),
    ("large later cut kept", [576, 191, 191, 100, 99], 12, [576, 191, 191, 99, 99]),
    ("a run of small cuts", [576, 300, 299, 298, 100, 99], 12, [576, 298, 298, 298, 99, 99]),
    ("a small first cut is the schedule's", [576, 575, 575, 100], 12, [576, 575, 575, 100]),
    ("no cut", [64, 64, 64], 2, [64, 64, 64]),
    ("exactly the minimum stays", [64, 40, 38, 38], 2, [64, 40, 38, 38]),
]


@pytest.mark.parametrize("name,keep,min_drop,expected", CASES, ids=[c[0] for c in CASES])
def test_fold_small_cuts(name, keep, min_drop, expected):
    assert fold_small_cuts(keep, min_drop).tolist() == expected


def test_folding_only_lowers_the_flops(tiny, calibration):
    from recipe_compiler.collect import collect_statistics

    stats = collect_statistics(tiny.model, tiny.processor, calibration, format_prompt=tiny.format_prompt)
    shape = LMShape.from_config(tiny.model.config.text_config)
    cost = cost_table(shape, stats.n_other, stats.n_visual, 576)
    probes = scorer_probes(shape, stats, "fitprune", 576)
    rng = np.random.default_rng(0)
    for _ in range(200):
        keep = np.concatenate([[576], np.sort(rng.integers(0, 577, size=shape.num_layers - 1))[::-1]])
        folded = fold_small_cuts(keep, 12)
        assert folded[0] == keep[0] and np.all(folded <= keep) and np.all(np.diff(folded) <= 0)
        assert schedule_flops(cost, folded, probes) <= schedule_flops(cost, keep, probes)


@pytest.mark.parametrize("budget", [0.45, 0.3])
def test_compiled_recipes_have_no_small_later_cut(tiny, budget):
    calibration = load_calibration(samples=4)
    result = compile_recipe(tiny.model, tiny.processor, calibration, CompileConfig(budget, pre_llm="none"),
                            format_prompt=tiny.format_prompt)
    keep = result.recipe.keep_count
    drops = [int(keep[l - 1] - keep[l]) for l in range(1, len(keep)) if keep[l] < keep[l - 1]]
    assert drops, "the recipe prunes"
    assert all(drop >= math.ceil(MIN_CUT_DROP * 576) for drop in drops[1:]), keep.tolist()
    assert result.verification.flops_fraction <= budget * (1 + 1e-9)

"""The compile pipeline on tiny-llava: statistics ≡ eager attention, searches, verification."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_inputs
from recipe_compiler.collect import collect_statistics
from recipe_compiler.compile import BUDGET_RTOL, CompileConfig, compile_recipe
from recipe_compiler.divergence import divergence_table, schedule_objective
from recipe_compiler.errors import BudgetError, StatisticsError
from recipe_compiler.flops import LMShape
from recipe_compiler.verify import verify_recipe
from runtime import Recipe
from runtime.families import model_fingerprint


@pytest.fixture(scope="module")
def stats(tiny, calibration):
    return collect_statistics(tiny.model, tiny.processor, calibration, format_prompt=tiny.format_prompt, batch_size=3)


@pytest.mark.parametrize("head_reduce", ["max", "mean"])
def test_statistics_equal_eager_output_attentions_on_a_left_padded_batch(tiny, tiny_eager, calibration, head_reduce):
    samples = calibration.samples[:3]
    stats = collect_statistics(tiny.model, tiny.processor, calibration.__class__(samples, "test"),
                               format_prompt=tiny.format_prompt, batch_size=3, head_reduce=head_reduce)
    inputs = make_inputs(tiny, samples)
    assert (inputs["attention_mask"] == 0).any()
    with torch.no_grad():
        attentions = tiny_eager.model(**inputs, output_attentions=True).attentions
    ids, valid = inputs["input_ids"], inputs["attention_mask"].bool()
    worst = 0.0
    for row in range(3):
        visual = (ids[row] == tiny.image_token_id) & valid[row]
        position = torch.arange(ids.shape[1])
        text = valid[row] & (position > position[visual].max())
        n = int(visual.sum())
        for layer, probs in enumerate(attentions):
            a = probs[row].amax(0) if head_reduce == "max" else probs[row].mean(0)
            expected = {
                "cross": a[text][:, visual].mean(0),
                "self_attn": a[visual][:, visual].sum(0) / n,
                "last": a[-1][visual],
            }
            for name, value in expected.items():
                got = torch.from_numpy(getattr(stats, name)[row, layer, :n])
                worst = max(worst, float((got - value).abs().max()))
    assert worst <= 1e-5


@pytest.mark.parametrize("budget", [0.45, 0.6, 0.8])
def test_optimal_is_no_worse_than_any_search_and_all_meet_the_budget(tiny, calibration, stats, budget):
    results = {
        search: compile_recipe(tiny.model, tiny.processor, calibration, CompileConfig(budget, search=search),
                               format_prompt=tiny.format_prompt, statistics=stats)
        for search in ("optimal", "gsearch", "psigmoid", "fitprune")
    }
    table = divergence_table(stats, "fitprune")
    objectives = {s: schedule_objective(table, r.recipe.keep_count) for s, r in results.items()}
    for other in ("gsearch", "psigmoid", "fitprune"):
        assert objectives["optimal"] <= objectives[other] + 1e-12, other
    for result in results.values():
        assert result.verification.flops_fraction <= budget * (1 + BUDGET_RTOL)
        assert np.all(np.diff(result.recipe.keep_count) <= 0)


def test_keep_all_recipe_verifies_to_full_flops_and_zero_drift(tiny, calibration):
    recipe = Recipe.keep_all(model_fingerprint(tiny.model))
    shape = LMShape.from_config(tiny.model.config.text_config)
    result = verify_recipe(tiny.model, tiny.processor, calibration, recipe, shape, format_prompt=tiny.format_prompt)
    assert result.flops_fraction == 1.0 and result.kl == 0.0 and result.top1_agreement == 1.0


def test_budget_below_the_smallest_feasible_names_it(tiny, calibration, stats):
    with pytest.raises(BudgetError, match=r"use --budget 0\.\d+ or more"):
        compile_recipe(tiny.model, tiny.processor, calibration, CompileConfig(0.05), format_prompt=tiny.format_prompt, statistics=stats)


def test_statistics_from_another_calibration_set_are_refused(tiny, calibration, stats):
    other = calibration.__class__(calibration.samples[:2], "subset")
    with pytest.raises(StatisticsError, match="different calibration set"):
        compile_recipe(tiny.model, tiny.processor, other, CompileConfig(0.5), format_prompt=tiny.format_prompt, statistics=stats)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(budget=0.0), BudgetError, r"\(0, 1\]"),
        (dict(budget=1.01), BudgetError, r"\(0, 1\]"),
        (dict(budget=float("nan")), BudgetError, "number"),
        (dict(budget="0.5"), BudgetError, "number"),
        (dict(budget=0.5, search="bayes"), ValueError, "optimal, gsearch, psigmoid, fitprune"),
        (dict(budget=0.5, scorer="nope"), ValueError, "fitprune, text-mean, last-token"),
        (dict(budget=0.5, head_reduce="sum"), ValueError, "max, mean"),
        (dict(budget=0.5, batch_size=0), ValueError, "positive integer"),
    ],
)
def test_config_validates_on_construction(kwargs, error, message):
    with pytest.raises(error, match=message):
        CompileConfig(**kwargs)


def test_budget_one_keeps_every_token(tiny, calibration, stats):
    result = compile_recipe(tiny.model, tiny.processor, calibration, CompileConfig(1.0), format_prompt=tiny.format_prompt, statistics=stats)
    assert result.recipe.pruning_layers == [] and result.verification.flops_fraction == 1.0


@pytest.mark.parametrize("search", ["optimal", "gsearch", "psigmoid"])
@pytest.mark.parametrize("ulps", [0, -2])
def test_a_budget_at_the_floor_compiles_to_the_cheapest_schedule(tiny, calibration, stats, search, ulps):
    from recipe_compiler.flops import min_feasible_budget

    from recipe_compiler.compile import scorer_probes

    shape = LMShape.from_config(tiny.model.config.text_config)
    v_ref = int(stats.max_visual)
    # The floor counts the one cut's probe (the default scorer's, fitprune)
    budget = min_feasible_budget(shape, stats.n_other, stats.n_visual, v_ref, probes=scorer_probes(shape, stats, "fitprune", v_ref))
    for _ in range(-ulps):
        budget = float(np.nextafter(budget, 0.0))
    # The in-LLM floor: without a pre-LLM stage (the default, auto, may meet it with a stage instead).
    result = compile_recipe(tiny.model, tiny.processor, calibration, CompileConfig(budget, search=search, pre_llm="none"),
                            format_prompt=tiny.format_prompt, statistics=stats)
    assert result.recipe.keep_count[1:].max() == 0  # every visual token gone after layer 0
    assert result.verification.flops_fraction <= budget * (1 + BUDGET_RTOL)

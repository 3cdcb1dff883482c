"""A fixed-ratio pre-LLM stage combined with FitPrune's model-in-the-loop search, on tiny-llava."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_inputs
from recipe_compiler.compile import CompileConfig, compile_recipe, scorer_probes
from recipe_compiler.flops import LMShape, cost_table, cut_flops, schedule_flops_fraction
from recipe_compiler.search.fitprune import stage_flops_fraction
from runtime import load
from runtime.prellm import stage_count

BUDGET = 0.3


@pytest.fixture(scope="module")
def compiled(tiny, calibration):
    config = CompileConfig(budget=BUDGET, search="fitprune", pre_llm="g-prune", pre_llm_ratio=0.5)
    return compile_recipe(tiny.model, tiny.processor, calibration, config, format_prompt=tiny.format_prompt)


def test_gprune_then_fitprune_meets_the_budget_on_verification(compiled):
    recipe, v = compiled.recipe, compiled.verification
    assert v.flops_fraction <= BUDGET * (1 + 1e-9)
    assert recipe.provenance["flops_fraction"] == pytest.approx(v.flops_fraction, abs=1e-9)
    assert recipe.provenance["search"] == "fitprune" and recipe.provenance["search_params"]["pre_llm"] == "g-prune"
    assert 0 < recipe.provenance["search_params"]["alpha"] <= 1


def test_the_recipe_holds_both_the_stage_and_an_in_llm_schedule(compiled):
    recipe = compiled.recipe
    assert recipe.pre_llm == {"method": "g-prune", "keep_ratio": 0.5, "params": {"steps": 5, "temperature": 0.03, "threshold": 0.5}}
    keep = recipe.keep_count
    assert keep[0] == 576 and keep.min() < 576  # the schedule (relative to survivors) prunes inside the LM too
    assert np.all(np.diff(keep) <= 0)


def test_flops_include_the_stage_saving_from_layer_zero(tiny, compiled):
    stats, recipe = compiled.statistics, compiled.recipe
    shape = LMShape.from_config(tiny.model.config.text_config)
    # layer 0 already runs only the survivors: the measured visual count entering layer 0 is the stage's
    survivors = np.array([stage_count(0.5, int(n)) for n in stats.n_visual])
    assert compiled.verification.visual_tokens_per_layer[0] == pytest.approx(survivors.mean())
    planned = stage_flops_fraction(shape, stats.n_other, stats.n_visual, survivors, recipe.keep_count, 576)
    # plus the scorer's probe at each in-LLM cut, on the survivors
    unpruned = float(np.sum(cost_table(shape, stats.n_other, stats.n_visual, 576)[:, 576]))
    planned += cut_flops(scorer_probes(shape, stats, recipe.scorer, 576, n_visual=survivors), recipe.keep_count) / unpruned
    assert compiled.verification.flops_fraction == pytest.approx(planned, rel=1e-9)
    # the same schedule without the stage would spend more than the budget
    assert schedule_flops_fraction(shape, stats.n_other, stats.n_visual, recipe.keep_count, 576) > BUDGET


def test_round_trip_and_generate(tiny, calibration, compiled, tmp_path):
    path = tmp_path / "r.safetensors"
    compiled.recipe.save(path)
    loaded = load(path)
    assert loaded.pre_llm == compiled.recipe.pre_llm and np.array_equal(loaded.keep_count, compiled.recipe.keep_count)
    assert loaded.to_bytes() == compiled.recipe.to_bytes()
    inputs = make_inputs(tiny, calibration.samples[:2])
    with torch.no_grad(), loaded.apply(tiny.model) as handle:
        out = tiny.model.generate(**inputs, max_new_tokens=3, do_sample=False)
        request = handle.last_request
    assert out.shape == (2, inputs["input_ids"].shape[1] + 3)
    entering = torch.stack(request.visual_per_layer, dim=1)
    assert entering[:, 0].tolist() == [stage_count(0.5, 576)] * 2  # the stage on entry to layer 0
    assert int(entering[:, -1].max()) < stage_count(0.5, 576)  # then the in-LLM schedule


@pytest.mark.parametrize("pre_llm, ratio, fragment", [
    ("auto", None, "--pre-llm auto compares"),
    ("cls-inflection", None, "brings its own in-LLM cut"),
    ("g-prune", None, "needs --pre-llm-ratio"),
    ("fopru-rank", None, "needs --pre-llm-ratio"),
])
def test_combinations_that_are_refused_say_why_and_what_to_use(pre_llm, ratio, fragment):
    with pytest.raises(ValueError, match=fragment.replace("-", r"\-")) as info:
        CompileConfig(budget=0.5, search="fitprune", pre_llm=pre_llm, pre_llm_ratio=ratio)
    assert "\n" not in str(info.value) and "--search optimal" in str(info.value)


def test_cli_refusal_is_one_line_and_writes_nothing(tmp_path, capsys):
    from recipe_compiler.cli import compile_main

    out = tmp_path / "r.safetensors"
    code = compile_main(["--model", "tiny-llava", "--budget", "0.5", "--search", "fitprune", "--pre-llm", "auto", "-o", str(out)])
    err = capsys.readouterr().err
    assert code != 0 and len(err.strip().splitlines()) == 1 and "--pre-llm auto" in err and not out.exists()


@pytest.mark.parametrize("n_post, keep, expected", [
    # 2-layer toy LM (d 2, m 3, 1 head of 2): layer_flops(n) = 2·[34·n + 2·n(n+1)]; 1 other token.
    ([2], [2, 2], 1.0),  # no stage, keep all
    ([1], [2, 2], 2 * 160 / (2 * 252)),  # the stage halves the image: 2 tokens enter each layer
    ([1], [2, 0], (160 + 76) / (2 * 252)),  # then the schedule drops the survivor after layer 0
])
def test_stage_flops_fraction_by_hand(n_post, keep, expected):
    shape = LMShape(num_layers=2, hidden=2, intermediate=3, num_heads=1, num_kv_heads=1, head_dim=2)
    assert stage_flops_fraction(shape, [1], [2], n_post, keep, v_ref=2) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("pre_llm, counts, expected", [
    ({"method": "g-prune", "keep_ratio": 0.25, "params": {"steps": 3, "temperature": 0.05, "threshold": 0.7}}, [576] * 8,
     "pre-LLM   g-prune: keeps 0.25 of each image's tokens, on entry to layer 0 (steps 3, temperature 0.05, threshold 0.7)"),
    ({"method": "fopru-row", "keep_ratio": 0.5, "params": {}}, [576] * 8,
     "pre-LLM   fopru-row: keeps 0.5 of each image's tokens, on entry to layer 0"),
    ({"method": "cls-inflection", "params": {"stage2_layer": 3, "stage2_ratio": 0.5}}, [576] * 3 + [288] * 5,
     "pre-LLM   cls-inflection: keeps each image's tokens up to the knee of its CLS-similarity curve, on entry to "
     "layer 0; stage 2: 0.5 of the survivors from layer 3"),
    ({"method": "none"}, [576] * 8, "pre-LLM   none"),
])
def test_inspect_shows_the_whole_stage(tiny, tmp_path, capsys, pre_llm, counts, expected):
    from recipe_compiler.cli import inspect_main
    from runtime import Recipe
    from runtime.families import model_fingerprint

    scorer = "text-mean" if pre_llm["method"] == "cls-inflection" else "fitprune"
    path = tmp_path / "r.safetensors"
    Recipe(keep_count=np.array(counts), scorer=scorer, fingerprint=model_fingerprint(tiny.model), pre_llm=pre_llm).save(path)
    assert inspect_main([str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert expected in lines

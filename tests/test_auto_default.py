"""The default compile compares every pre-LLM stage, none included, and keeps the least measured drift.

``CompileConfig(budget)`` with a table search means ``pre_llm="auto"``: each stage's least-divergence
schedule in budget is a finalist, the finalists run on the calibration set, and the least next-token
KL wins. A model-in-the-loop or peer search cannot compare stages and defaults to ``none``.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from recipe_compiler.compile import BUDGET_RTOL, CompileConfig, compile_recipe, default_pre_llm


@pytest.fixture(scope="module")
def stats(tiny, calibration):
    from recipe_compiler.collect import collect_statistics

    return collect_statistics(tiny.model, tiny.processor, calibration, format_prompt=tiny.format_prompt)


@pytest.mark.parametrize("search, expected", [("optimal", "auto"), ("gsearch", "auto"), ("psigmoid", "auto"),
                                              ("fitprune", "none"), ("fastv", "none"), ("pdrop", "none"), ("dart", "none")])
def test_the_default_stage_is_auto_with_a_table_search_and_none_otherwise(search, expected):
    assert CompileConfig(0.45, search=search).pre_llm == expected == default_pre_llm(search)


def test_naming_auto_with_the_model_in_the_loop_search_is_still_refused():
    with pytest.raises(ValueError, match="--pre-llm auto compares the stages"):
        CompileConfig(0.45, search="fitprune", pre_llm="auto")


def test_a_keep_all_recipe_drifts_by_exactly_zero_and_a_pruned_one_by_more(tiny, calibration, stats):
    from runtime import Recipe
    from runtime.families import model_fingerprint

    from recipe_compiler.verify import next_token_kl

    fp = model_fingerprint(tiny.model)
    pruned = compile_recipe(tiny.model, tiny.processor, calibration, CompileConfig(0.3, pre_llm="g-prune", pre_llm_ratio=0.25),
                            format_prompt=tiny.format_prompt, statistics=stats)
    kls = next_token_kl(tiny.model, tiny.processor, calibration, [Recipe.keep_all(fp), pruned.recipe], format_prompt=tiny.format_prompt)
    assert kls.shape == (2,) and kls[0] == 0.0 and kls[1] > 0.0
    assert kls[1] == pytest.approx(pruned.verification.kl, rel=1e-5)  # the verification's measure, on the same samples


@pytest.mark.parametrize("budget", [0.6, 0.45, 0.3])
def test_the_default_compile_keeps_the_finalist_that_drifts_least(tiny, calibration, stats, budget):
    result = compile_recipe(tiny.model, tiny.processor, calibration, CompileConfig(budget), format_prompt=tiny.format_prompt,
                            statistics=stats)
    candidates = result.details["pre_llm_candidates"]
    finalists = [c for c in candidates if c.kl is not None]
    methods = [c.method for c in finalists]
    assert methods[0] == "none" and len(methods) == len(set(methods)) >= 3  # one per stage, none included
    for c in finalists:  # each stage's finalist is its least-divergence schedule within the budget
        same = [o for o in candidates if o.method == c.method and o.feasible]
        assert c.feasible and c.divergence == min(o.divergence for o in same)
    chosen = result.details["pre_llm_chosen"]
    assert chosen.kl == min(c.kl for c in finalists)
    assert result.recipe.pre_llm == chosen.pre_llm
    assert np.array_equal(result.recipe.keep_count, chosen.keep)
    # The verification pass runs the same recipe on the same samples: the same drift.
    assert result.verification.kl == pytest.approx(chosen.kl, rel=1e-5, abs=1e-12)
    assert result.verification.flops_fraction <= budget * (1 + BUDGET_RTOL)
    assert result.recipe.provenance["search_params"]["pre_llm_selection"] == "calibration-kl"
    assert "select" in result.timings


def test_the_default_cli_prints_one_summary_line_and_its_json_holds_the_table(stats, tmp_path, capsys):
    from runtime import load

    from recipe_compiler.cli import compile_main
    from recipe_compiler.statistics import save_statistics

    saved = tmp_path / "stats.safetensors"
    save_statistics(stats, saved)
    common = ["--model", "tiny-llava", "--samples", "6", "--quiet", "--budget", "0.45", "--stats", str(saved)]
    assert compile_main([*common, "-o", str(tmp_path / "a.safetensors")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("budget 0.45 |") and " | pre-llm " in lines[0] and " select " in lines[0]
    assert compile_main([*common, "--json", "-o", str(tmp_path / "b.safetensors")]) == 0
    summary = json.loads(capsys.readouterr().out)
    table = summary["pre_llm_table"].splitlines()
    assert table[0].split()[-1] == "kl" and sum(line.startswith("*") for line in table) == 1
    assert summary["pre_llm"] == load(tmp_path / "b.safetensors").pre_llm
    # Deterministic: the same inputs compile the same bytes.
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_statistics_without_a_stage_s_scores_skip_it_under_the_default(tiny, calibration, stats):
    from dataclasses import replace

    from runtime.methods.stages import STAGES

    partial = replace(stats, prellm={k: v for k, v in stats.prellm.items() if k != STAGES["g-prune"].statistic})
    result = compile_recipe(tiny.model, tiny.processor, calibration, CompileConfig(0.45), format_prompt=tiny.format_prompt,
                            statistics=partial)
    skipped = {c.method: c.skipped for c in result.details["pre_llm_candidates"] if c.skipped}
    assert "recollect them without --stats" in skipped["g-prune"]
    assert result.recipe.pre_llm["method"] != "g-prune"
    with pytest.raises(Exception, match="G-Prune scores|g-prune scores"):  # named explicitly, the stage still needs them
        compile_recipe(tiny.model, tiny.processor, calibration, CompileConfig(0.45, pre_llm="g-prune"), format_prompt=tiny.format_prompt,
                       statistics=partial)

"""The in-LLM peer methods as users pick them: ``--search fastv|pdrop|dart|sparsevlm`` (issue 14).

Each compiles at budgets 0.45 and 0.25 on every family it supports, meets the budget on the
real runtime's verification (its own probes counted), records the method in the recipe, and is
faithful by default (the reference's layers, scorer and head reduction); the paper settings are
``--search-param``. The scorer's head reduction is part of its definition: ``last-token`` is
head-mean (FastV, PyramidDrop) unless ``--head-reduce`` says otherwise.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest

from families import FamilyCase, family_params
from recipe_compiler import CompileConfig, compile_recipe, load_calibration
from recipe_compiler.cli import compile_main
from recipe_compiler.errors import BudgetError
from recipe_compiler.search import SEARCHES
from runtime import Recipe, RecipeMismatchError, load
from runtime.families import model_fingerprint
from runtime.methods.scorers import SCORERS

METHODS = [name for name, search in SEARCHES.items() if search.is_method]
BUDGETS = (0.45, 0.25)
SAMPLES = 8


@functools.lru_cache(maxsize=None)
def _calibration():
    return load_calibration(samples=SAMPLES)


@functools.lru_cache(maxsize=None)
def _statistics(case: FamilyCase, head_reduce: str):
    from recipe_compiler.collect import collect_statistics

    loaded = case.load()
    return collect_statistics(loaded.model, loaded.processor, _calibration(), head_reduce=head_reduce,
                              format_prompt=loaded.format_prompt)


def _compile(case: FamilyCase, budget: float, method: str, **params):
    loaded = case.load()
    config = CompileConfig(budget=budget, search=method, search_params=params or None)
    return compile_recipe(loaded.model, loaded.processor, _calibration(), config, format_prompt=loaded.format_prompt,
                          statistics=_statistics(case, config.head_reduce))


def _floor(case: FamilyCase) -> float:
    from recipe_compiler.flops import LMShape, min_feasible_budget
    from runtime.families import family_for

    model = case.load().model
    stats = _statistics(case, "max")
    shape = LMShape.from_config(family_for(model).text_config(model))
    return min_feasible_budget(shape, stats.n_other, stats.n_visual, model_fingerprint(model)["visual_tokens"])


# ----------------------------------------------------------------------------- head reduction


def test_last_token_is_head_mean_by_default_everywhere():
    assert SCORERS["last-token"].head_reduce == "mean" and SCORERS["fitprune"].head_reduce == "max"
    assert CompileConfig(budget=0.5, scorer="last-token").head_reduce == "mean"
    assert CompileConfig(budget=0.5).head_reduce == "max"  # fitprune keeps FitPrune's max
    assert CompileConfig(budget=0.5, scorer="last-token", head_reduce="max").head_reduce == "max"  # explicit wins
    fp = {"model_type": "llava", "num_layers": 2, "hidden_size": 8, "num_heads": 2, "num_kv_heads": 2,
          "visual_tokens": 4, "config_hash": "0" * 16}
    assert Recipe.keep_all(fp, scorer="last-token").head_reduce == "mean"
    assert Recipe.keep_all(fp, scorer="last-token", head_reduce="max").head_reduce == "max"


def test_cli_last_token_records_head_mean_and_head_reduce_overrides(tmp_path, capsys):
    out = tmp_path / "r.safetensors"
    assert compile_main(["--budget", "0.6", "--scorer", "last-token", "--samples", "4", "--quiet", "-o", str(out)]) == 0
    recipe = load(out)
    assert (recipe.scorer, recipe.head_reduce, recipe.provenance["head_reduce"]) == ("last-token", "mean", "mean")
    assert compile_main(["--budget", "0.6", "--scorer", "last-token", "--head-reduce", "max", "--samples", "4", "--quiet",
                         "-o", str(out)]) == 0
    assert load(out).head_reduce == "max"


# ----------------------------------------------------------------------------- every method, every budget


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", family_params())
def test_method_compiles_and_meets_the_budget(case: FamilyCase, method: str, budget: float):
    search = SEARCHES[method]
    scorer = SCORERS[search.scorer]
    reason = scorer.unsupported_reason(case.load().model)
    if reason is not None:  # refused at compile with the reason
        with pytest.raises(ValueError, match=search.scorer):
            _compile(case, budget, method)
        return
    floor = _floor(case)
    if budget < floor:  # no schedule of any method fits this family's prompts: refused, naming the floor
        with pytest.raises(BudgetError, match="--budget"):
            _compile(case, budget, method)
        return
    result = _compile(case, budget, method)
    recipe = result.recipe
    assert result.verification.flops_fraction <= budget * (1 + 1e-9)
    assert recipe.scorer == search.scorer and recipe.head_reduce == scorer.head_reduce
    assert recipe.provenance["search"] == method and recipe.provenance["search_params"]["method"] == search.provenance
    assert recipe.pruning_layers, "the method pruned nothing"
    assert result.verification.flops_fraction > budget - 0.05, "the search left most of the budget unused"


# ----------------------------------------------------------------------------- FastV


def test_fastv_is_one_cut_at_layer_k_and_paper_settings_are_available():
    case = family_params()[0].values[0]
    v = model_fingerprint(case.load().model)["visual_tokens"]
    recipe = _compile(case, 0.45, "fastv").recipe
    assert recipe.pruning_layers == [2] and recipe.keep_count[:2].tolist() == [v, v]
    k3 = _compile(case, 0.45, "fastv", layer=3).recipe
    assert k3.pruning_layers == [3] and k3.keep_count[3] < recipe.keep_count[2]  # a later cut keeps fewer
    paper = _compile(case, 0.9, "fastv", drop_ratio=0.5).recipe
    assert paper.keep_count[2] == v // 2 and paper.provenance["search_params"]["drop_ratio"] == 0.5
    with pytest.raises(BudgetError, match="drop ratio 0.5"):
        _compile(case, 0.3, "fastv", drop_ratio=0.5)
    with pytest.raises(BudgetError, match="--budget"):
        _compile(case, 0.2, "fastv", layer=6)
    moved = _compile(case, 0.25, "fastv").recipe
    assert moved.pruning_layers == [1] and "layer_moved" in moved.provenance["search_params"]


def test_a_method_refuses_a_foreign_scorer_and_unknown_settings():
    with pytest.raises(ValueError, match="own scorer 'last-token'"):
        CompileConfig(budget=0.5, search="fastv", scorer="fitprune")
    with pytest.raises(ValueError, match="no parameter 'lambda'"):
        CompileConfig(budget=0.5, search="fastv", search_params={"lambda": 0.5})
    with pytest.raises(ValueError, match="out of range"):
        CompileConfig(budget=0.5, search="fastv", search_params={"drop_ratio": 2})
    with pytest.raises(ValueError, match="takes no --search-param"):
        CompileConfig(budget=0.5, search="optimal", search_params={"layer": 2})
    with pytest.raises(ValueError, match="no --pre-llm"):
        CompileConfig(budget=0.5, search="fastv", pre_llm="g-prune")


def test_cli_fastv_records_the_method(tmp_path, capsys):
    out = tmp_path / "f.safetensors"
    assert compile_main(["--budget", "0.45", "--search", "fastv", "--search-param", "layer=3", "--samples", "4", "--quiet",
                         "-o", str(out)]) == 0
    recipe = load(out)
    assert recipe.scorer == "last-token" and recipe.head_reduce == "mean" and recipe.pruning_layers == [3]
    assert recipe.provenance["search_params"]["layer"] == 3
    assert "fastv layer 3" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        compile_main(["--budget", "0.45", "--search", "fastv", "--search-param", "layer", "-o", str(out)])
    assert "NAME=VALUE" in capsys.readouterr().err

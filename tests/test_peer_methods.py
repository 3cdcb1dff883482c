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
from runtime.families import family_for, model_fingerprint
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
    return min_feasible_budget(shape, stats.n_other, stats.n_visual, model_fingerprint(model)["visual_tokens"],
                               min(family_for(model).cut_layers(model), default=shape.num_layers))


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
    model = case.load().model
    fp = model_fingerprint(model)
    counts = search.example(fp["num_layers"], fp["visual_tokens"])
    cuts = {layer for layer in range(1, len(counts)) if counts[layer] < counts[layer - 1]}
    if not cuts <= set(family_for(model).cut_layers(model)):  # its paper layer follows a layer without attention rows
        with pytest.raises(ValueError, match="may prune only entering layers"):
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


# ----------------------------------------------------------------------------- the runtime computes the reference's math


def _first_cut(method: str, case: FamilyCase | None = None):
    """(model, inputs, the recipe at paper defaults, the runtime's keep set at its first cut, unpruned hidden states)."""
    import torch

    from recipe_compiler.collect import model_inputs

    case = case or family_params()[0].values[0]
    loaded = case.load()
    model = loaded.model
    fp = model_fingerprint(model)
    search = SEARCHES[method]
    recipe = Recipe(keep_count=search.example(fp["num_layers"], fp["visual_tokens"]), scorer=search.scorer, fingerprint=fp)
    inputs = model_inputs(model, loaded.processor, _calibration().samples[:1], loaded.format_prompt)
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True, use_cache=False).hidden_states
        with recipe.apply(model) as handle:
            model(**inputs, use_cache=False)
            request = handle.last_request
    first = recipe.pruning_layers[0]
    kept = set(request.selection[first][0].tolist())
    return model, inputs, recipe, first, kept, hidden


def _qk(model, layer: int, x, positions):
    """Plain post-RoPE q and k of decoder ``layer`` on its input ``x`` (1, L, D): 1-D rotate-half RoPE."""
    import torch

    from runtime.families import family_for

    block = family_for(model).layers(model)[layer]
    attn = block.self_attn
    h = block.input_layernorm(x)[0]
    hd = attn.head_dim
    q = (h @ attn.q_proj.weight.T + (attn.q_proj.bias if attn.q_proj.bias is not None else 0)).view(h.shape[0], -1, hd)
    k = (h @ attn.k_proj.weight.T + (attn.k_proj.bias if attn.k_proj.bias is not None else 0)).view(h.shape[0], -1, hd)
    config = family_for(model).text_config(model)
    theta = float(getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"])
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angle = positions.double()[:, None] * inv[None, :]
    cos, sin = torch.cat([angle.cos()] * 2, -1).float(), torch.cat([angle.sin()] * 2, -1).float()

    def rope(t):
        half = t.shape[-1] // 2
        rot = torch.cat([-t[..., half:], t[..., :half]], -1)
        return t * cos[:, None] + rot * sin[:, None]

    return rope(q), rope(k), inv, attn.scaling


def _visual(model, inputs):
    from runtime.families import family_for

    return family_for(model).prunable_visual_tokens(model, inputs["input_ids"], inputs)[0]


def test_pdrop_scores_with_the_pruning_layers_own_qk_at_its_input():
    import torch

    model, inputs, recipe, first, kept, hidden = _first_cut("pdrop")
    L = inputs["input_ids"].shape[1]
    q, k, _, scaling = _qk(model, first, hidden[first], torch.arange(L))  # the input of the pruning layer itself
    heads = q.shape[1]
    k = k.repeat_interleave(heads // k.shape[1], dim=1)
    row = torch.softmax(torch.einsum("hd,lhd->hl", q[-1], k) * scaling, dim=-1).mean(0)
    visual = _visual(model, inputs)
    n_keep = int(recipe.keep_counts_for(int(visual.sum()))[first])
    positions = torch.nonzero(visual).flatten()
    expected = set(positions[torch.argsort(row[positions], descending=True)[:n_keep]].tolist())
    assert kept == expected


def test_dart_keeps_the_reference_set_at_layer_k():
    import torch

    from runtime.families import family_for
    from runtime.peer_math import dart

    model, inputs, recipe, first, kept, hidden = _first_cut("dart")
    L = inputs["input_ids"].shape[1]
    _, keys, _, _ = _qk(model, first - 1, hidden[first - 1], torch.arange(L))  # layer K − 1's keys
    normed = family_for(model).language_model(model).norm(hidden[first])  # layer K − 1's output, final norm
    visual = _visual(model, inputs)
    position = torch.arange(L)
    text = position > torch.nonzero(visual).flatten().max()
    n_keep = int(recipe.keep_counts_for(int(visual.sum()))[first])
    per = (n_keep - 4) // 8
    with torch.no_grad():
        reference_set = dart.dart_keep(keys.reshape(L, -1)[None], normed, visual[None], text[None], budget=per * 8)[0]
    chosen = set(torch.nonzero(reference_set).flatten().tolist())
    assert chosen <= kept and len(kept) == n_keep  # the reference's set, topped up to the recipe's count


def test_sparsevlm_scores_with_raters_rope_corrected_top_heads():
    import torch

    from runtime.peer_math import sparsevlm

    model, inputs, recipe, first, kept, hidden = _first_cut("sparsevlm")
    scoring = first - 1  # SparseVLM drops from the scoring layer's output
    L = inputs["input_ids"].shape[1]
    visual = _visual(model, inputs)
    position = torch.arange(L)
    text = position > torch.nonzero(visual).flatten().max()
    raters = sparsevlm.raters(hidden[0][0, visual], hidden[0][0, text])
    q, k, inv, scaling = _qk(model, scoring, hidden[scoring], position)
    heads = q.shape[1]
    k = k.repeat_interleave(heads // k.shape[1], dim=1)
    logits = torch.einsum("qhd,lhd->hql", q, k) * scaling
    logits = logits.masked_fill(position[None, None, :] > position[None, :, None], float("-inf"))
    attn = torch.softmax(logits, -1)[:, text][:, raters][:, :, visual]
    rows, columns = position[text][raters], position[visual]
    bias = sparsevlm.rope_bias(rows[None], columns[None], inv)[0]
    with torch.no_grad():
        s = sparsevlm.scores(attn[None], torch.ones(1, int(raters.sum()), dtype=torch.bool), bias[None])[0]
    n_keep = int(recipe.keep_counts_for(int(visual.sum()))[first])
    expected = set(columns[torch.argsort(s, descending=True)[:n_keep]].tolist())
    assert kept == expected


def test_each_method_records_its_settings_and_takes_the_paper_ones():
    case = family_params()[0].values[0]
    v = model_fingerprint(case.load().model)["visual_tokens"]
    paper = _compile(case, 0.9, "pdrop", lam=0.5).recipe
    assert paper.pruning_layers == [2, 4, 6] and paper.keep_count[[2, 4, 6]].tolist() == [288, 144, 72]
    assert paper.provenance["search_params"]["lam"] == 0.5 and paper.scorer == "pdrop"
    dart = _compile(case, 0.9, "dart", max_num_trunction=128).recipe
    assert dart.pruning_layers == [2] and dart.keep_count[2] == 132 == 4 + 8 * (128 // 8)
    sparse = _compile(case, 0.9, "sparsevlm", tokens=192).recipe
    assert sparse.pruning_layers == [1, 2, 4] and sparse.keep_count[[1, 2, 4]].tolist() == [300, 200, 118]
    assert sparse.provenance["search_params"]["tokens"] == 192 and v == 576


def test_the_pdrop_probe_is_counted_in_the_flops():
    case = family_params()[0].values[0]
    result = _compile(case, 0.45, "pdrop")
    from recipe_compiler.flops import LMShape, schedule_flops_fraction
    from runtime.families import family_for

    model = case.load().model
    stats = _statistics(case, "mean")
    shape = LMShape.from_config(family_for(model).text_config(model))
    without = schedule_flops_fraction(shape, stats.n_other, stats.n_visual, result.recipe.keep_count, 576)
    assert result.verification.flops_fraction > without  # the verified figure includes the q/k probe
    assert result.verification.flops_fraction <= 0.45 * (1 + 1e-9)


def test_a_family_a_method_cannot_run_is_refused_at_compile_and_at_apply(monkeypatch):
    case = family_params()[0].values[0]
    loaded = case.load()
    model = loaded.model
    dart = SCORERS["dart"]
    monkeypatch.setattr(type(dart), "unsupported_reason", lambda self, m: "its language model has no final norm (test)")
    with pytest.raises(ValueError, match="--scorer dart .*cannot run on this model: its language model has no final norm"):
        compile_recipe(model, loaded.processor, _calibration(), CompileConfig(0.45, search="dart"), format_prompt=loaded.format_prompt)
    fp = model_fingerprint(model)
    recipe = Recipe(keep_count=SEARCHES["dart"].example(fp["num_layers"], fp["visual_tokens"]), scorer="dart", fingerprint=fp)
    with pytest.raises(RecipeMismatchError, match="scorer 'dart' cannot run on this model: its language model has no final norm"):
        recipe.apply(model)
    assert getattr(model, "_recipe_runtime_handle", None) is None

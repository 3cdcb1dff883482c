"""Pre-LLM stages end to end on tiny-llava: recipe file, runtime under generate(), compiler, CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import make_inputs
from runtime import Recipe, RecipeError, load, prellm
from runtime.families import model_fingerprint
from runtime.prellm import stage_count

GREEDY = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
IN_LLM = [576, 576, 400, 400, 200, 200, 100, 100]
CLS_PARAMS = {"stage2_layer": 3, "stage2_ratio": 0.5}
CLS_COUNTS = [576] * 3 + [288] * 5


def _stage_recipe(model, method, ratio=0.5, counts=IN_LLM):
    fp = model_fingerprint(model)
    if method == "cls-inflection":
        return Recipe(keep_count=np.array(CLS_COUNTS), scorer="text-mean", fingerprint=fp,
                      pre_llm={"method": method, "params": dict(CLS_PARAMS)})
    params = {"threshold": 0.5, "temperature": 0.03, "steps": 5} if method == "g-prune" else {}
    return Recipe(keep_count=np.array(counts), scorer="fitprune", fingerprint=fp,
                  pre_llm={"method": method, "keep_ratio": ratio, "params": params})


@pytest.fixture(scope="module")
def batch2(tiny, calibration):
    inputs = make_inputs(tiny, calibration.samples[:2])
    assert (inputs["attention_mask"] == 0).any(), "the batch must be left-padded"
    return inputs


def _vision_reference(model, pixel_values, eager=False):
    """Feature-layer hidden states (and attentions) straight from the vision tower."""
    tower = model.model.vision_tower
    out = tower(pixel_values, output_hidden_states=True, output_attentions=eager)
    index = model.config.vision_feature_layer
    layer = len(tower.encoder.layers) + 1 + index - 1  # encoder layer producing hidden_states[index]
    return out.hidden_states[index], (out.attentions[layer] if eager else None)


@pytest.mark.parametrize("method", ["g-prune", "fopru-rank", "fopru-row", "cls-inflection"])
def test_each_stage_round_trips_and_runs_under_generate_with_batch_2(tiny, batch2, tmp_path, method):
    model = tiny.model
    recipe = _stage_recipe(model, method)
    loaded = load(recipe.save(tmp_path / "r.safetensors"))
    assert loaded.pre_llm == recipe.pre_llm and np.array_equal(loaded.keep_count, recipe.keep_count)
    with torch.no_grad(), loaded.apply(model) as handle:
        out = model.generate(**batch2, **GREEDY)
        request = handle.last_request
        selection = request.selection
    assert out.sequences.shape[1] == batch2["input_ids"].shape[1] + 4
    assert all(torch.isfinite(step).all() for step in out.logits)
    entering = torch.stack(request.visual_per_layer, dim=1)  # (B, L)
    n_post = entering[:, 0]
    for row in range(2):
        expected = loaded.keep_counts_for(int(n_post[row]))
        assert entering[row].tolist() == expected.tolist()
    if method != "cls-inflection":
        assert n_post.tolist() == [stage_count(0.5, 576)] * 2

    # The layer-0 keep set is the pure scorer's on independently computed inputs.
    with torch.no_grad():
        hidden, _ = _vision_reference(model, batch2["pixel_values"])
    for row in range(2):
        visual = torch.nonzero(batch2["input_ids"][row] == model.config.image_token_id).flatten()
        if method == "g-prune":
            features = model.model.multi_modal_projector(hidden[row, 1:])
            mask = prellm.gprune_keep(features, stage_count(0.5, 576))
        elif method == "cls-inflection":
            mask = prellm.cls_inflection_keep(hidden[row, 1:], hidden[row, 0])
        else:
            continue  # FoPru is checked against eager attentions below
        assert torch.equal(selection[0][row], visual[mask])


@pytest.mark.parametrize("method", ["fopru-rank", "fopru-row"])
def test_fopru_selection_matches_the_encoder_attention(tiny_eager, calibration, method):
    model = tiny_eager.model
    inputs = make_inputs(tiny_eager, calibration.samples[:2])
    with torch.no_grad():
        _, attentions = _vision_reference(model, inputs["pixel_values"], eager=True)
        with _stage_recipe(model, method).apply(model) as handle:
            model(**inputs)
            selection = handle.last_request.selection
    for row in range(2):
        significance = prellm.fopru_significance(attentions[row])
        k = stage_count(0.5, 576)
        mask = prellm.fopru_rank_keep(significance, k) if method == "fopru-rank" else prellm.fopru_row_keep(significance, (24, 24), k)
        visual = torch.nonzero(inputs["input_ids"][row] == model.config.image_token_id).flatten()
        assert torch.equal(selection[0][row], visual[mask])


@pytest.mark.parametrize("method", ["g-prune", "fopru-rank", "fopru-row"])
def test_keep_all_stage_is_bit_identical_at_prefill_and_every_decode_step(tiny, batch2, method):
    model = tiny.model
    keep_all = _stage_recipe(model, method, ratio=1.0, counts=[576] * 8)
    with torch.no_grad():
        reference = model(**batch2).logits
        reference_gen = model.generate(**batch2, **GREEDY)
        with keep_all.apply(model) as handle:
            assert handle.policy.pruning_layers == (0,)  # the stage really runs
            patched = model(**batch2).logits
            patched_gen = model.generate(**batch2, **GREEDY)
    assert torch.equal(patched, reference)
    assert torch.equal(patched_gen.sequences, reference_gen.sequences)
    for a, b in zip(patched_gen.logits, reference_gen.logits):
        assert torch.equal(a, b)


def test_stage_cached_generation_equals_no_cache_recomputation(tiny, batch2):
    model = tiny.model
    with torch.no_grad(), _stage_recipe(model, "g-prune").apply(model) as handle:
        generated = model.generate(**batch2, **GREEDY)
        selection = handle.last_request.selection
        assert 0 in selection
        worst = 0.0
        with handle.replay(selection):
            for step in range(4):
                length = batch2["input_ids"].shape[1] + step
                mask = torch.cat([batch2["attention_mask"], torch.ones(2, step, dtype=torch.long)], dim=1)
                logits = model(
                    input_ids=generated.sequences[:, :length], attention_mask=mask,
                    pixel_values=batch2["pixel_values"], position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=False,
                ).logits[:, -1]
                worst = max(worst, float((logits - generated.logits[step]).abs().max()))
    assert worst <= 1e-4


def test_cls_inflection_keeps_different_counts_for_two_images_in_one_batch(tiny, batch2):
    model = tiny.model
    with torch.no_grad(), _stage_recipe(model, "cls-inflection").apply(model) as handle:
        model(**batch2)
        counts = handle.last_request.visual_per_layer
    first, stage2 = counts[0].tolist(), counts[3].tolist()
    assert first[0] != first[1] and all(0 < c < 576 for c in first)
    assert stage2 == [(2 * 288 * n + 576) // (2 * 576) for n in first]  # ρ of each image's survivors


def test_recipe_validation_names_the_bad_pre_llm_field(tiny):
    fp = model_fingerprint(tiny.model)
    counts = np.array(IN_LLM)
    bad = {
        "keep_ratio": {"method": "g-prune", "keep_ratio": 1.5, "params": {}},
        "params.steps": {"method": "g-prune", "keep_ratio": 0.5, "params": {"steps": -1}},
        "alpha": {"method": "g-prune", "keep_ratio": 0.5, "params": {"alpha": 1}},
        "pre_llm.params": {"method": "fopru-rank", "keep_ratio": 0.5, "params": {"layer": 3}},
        "feature_layer": {"method": "fopru-row", "keep_ratio": 0.5, "params": {"feature_layer": 0}},
        "inflection_detector": {"method": "cls-inflection", "params": {**CLS_PARAMS, "inflection_detector": "elbow"}},
        "stage2_layer": {"method": "cls-inflection", "params": {"stage2_layer": 0, "stage2_ratio": 0.5}},
        "keep_ratio'] in pre_llm": {"method": "cls-inflection", "keep_ratio": 0.5, "params": dict(CLS_PARAMS)},
    }
    for field, spec in bad.items():
        with pytest.raises(RecipeError, match=field.replace(".", r"\.")):
            Recipe(keep_count=counts, scorer="text-mean", fingerprint=fp, pre_llm=spec)
    with pytest.raises(RecipeError, match="keep_count must be the stage-2 schedule"):
        Recipe(keep_count=counts, scorer="text-mean", fingerprint=fp, pre_llm={"method": "cls-inflection", "params": dict(CLS_PARAMS)})
    with pytest.raises(RecipeError, match="text-mean"):
        Recipe(keep_count=np.array(CLS_COUNTS), scorer="fitprune", fingerprint=fp, pre_llm={"method": "cls-inflection", "params": dict(CLS_PARAMS)})
    assert Recipe(keep_count=counts, scorer="fitprune", fingerprint=fp).pre_llm == {"method": "none"}


@pytest.fixture(scope="module")
def stats(tiny, calibration):
    from recipe_compiler.collect import collect_statistics

    return collect_statistics(tiny.model, tiny.processor, calibration, format_prompt=tiny.format_prompt)


def test_statistics_carry_pre_llm_scores_through_save_and_load(stats, tmp_path):
    from recipe_compiler.statistics import load_statistics, save_statistics

    from runtime.methods.stages import STAGES

    assert sorted(stats.prellm) == sorted({stage.statistic for stage in STAGES.values()} | {"grid_row", "view"})
    assert all(v.shape == (stats.num_samples, 576) and np.isfinite(v).all() for v in stats.prellm.values())
    assert (stats.prellm["view"] == 0).all()  # LLaVA-1.5: one view per image
    assert np.array_equal(stats.prellm["grid_row"][0], np.repeat(np.arange(24), 24))  # its 24x24 grid, row-major
    save_statistics(stats, tmp_path / "s.safetensors")
    again = load_statistics(tmp_path / "s.safetensors")
    for name, value in stats.prellm.items():
        assert np.array_equal(again.prellm[name], value)


def test_divergence_table_with_all_survivors_matches_the_plain_table(stats):
    from recipe_compiler.divergence import divergence_table

    plain = divergence_table(stats, "fitprune", v_ref=576)
    everyone = divergence_table(stats, "fitprune", v_ref=576, survivors=np.ones((stats.num_samples, 576), bool))
    assert np.array_equal(plain, everyone)
    half = np.zeros((stats.num_samples, 576), bool)
    half[:, ::2] = True
    restricted = divergence_table(stats, "fitprune", v_ref=576, survivors=half)
    assert 0 < restricted[0, 576] < np.inf and np.all(restricted[1:, 576] >= restricted[0, 576] * 0)
    assert np.all(restricted[1:] >= plain[1:] - 1e-12)  # pre-dropped mass only adds loss


@pytest.mark.parametrize("method", ["fopru-rank", "cls-inflection"])
def test_compiled_stage_meets_the_budget_with_the_real_runtime(tiny, calibration, stats, method):
    from recipe_compiler.compile import CompileConfig, compile_recipe

    result = compile_recipe(tiny.model, tiny.processor, calibration, CompileConfig(budget=0.35, pre_llm=method),
                            format_prompt=tiny.format_prompt, statistics=stats)
    assert result.recipe.pre_llm["method"] == method
    assert result.verification.flops_fraction <= 0.35 * (1 + 1e-9)
    assert result.verification.visual_tokens_per_layer[0] < 576  # the stage saves from layer 0
    chosen = result.details["pre_llm_chosen"]
    assert abs(chosen.flops_fraction - result.verification.flops_fraction) < 1e-9  # planned == measured


def test_cli_pre_llm_auto_prints_the_candidate_table_and_exits_0(stats, tmp_path, capsys):
    from recipe_compiler.cli import compile_main
    from recipe_compiler.statistics import save_statistics

    out, saved = tmp_path / "r.safetensors", tmp_path / "stats.safetensors"
    save_statistics(stats, saved)  # the calibration pass is tested above; reuse it to keep this test short
    code = compile_main(["--model", "tiny-llava", "--samples", "6", "--quiet", "--budget", "0.3", "--pre-llm", "auto",
                         "--stats", str(saved), "-o", str(out)])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    lines = stdout.strip().splitlines()
    assert lines[0].startswith("pre-llm") and lines[-1].startswith("budget 0.3 |")
    table = "\n".join(lines[1:-1])
    for stage in ("none", "g-prune", "fopru-rank", "fopru-row", "cls-inflection"):
        assert stage in table
    assert sum(line.startswith("*") for line in lines[1:-1]) == 1
    recipe = load(out)
    assert recipe.provenance["flops_fraction"] <= 0.3 * (1 + 1e-9)
    assert recipe.pre_llm["method"] in ("none", "g-prune", "fopru-rank", "fopru-row", "cls-inflection")


def test_gprune_parameters_flow_from_the_config_into_statistics_and_the_recipe(tiny, calibration, stats):
    from recipe_compiler.collect import collect_statistics
    from recipe_compiler.compile import CompileConfig, compile_recipe
    from recipe_compiler.errors import StatisticsError

    with pytest.raises(ValueError, match="G-Prune parameter alpha"):
        CompileConfig(budget=0.5, pre_llm="g-prune", gprune={"alpha": 1.0})
    config = CompileConfig(budget=0.5, pre_llm="g-prune", pre_llm_ratio=0.5, gprune={"threshold": 0.7, "steps": 3})
    with pytest.raises(StatisticsError, match="G-Prune scores"):  # the fixture's scores use the defaults
        compile_recipe(tiny.model, tiny.processor, calibration, config, format_prompt=tiny.format_prompt, statistics=stats)
    two = calibration.__class__(calibration.samples[:2], "two")
    own = collect_statistics(tiny.model, tiny.processor, two, format_prompt=tiny.format_prompt, prellm_params=config.gprune)
    result = compile_recipe(tiny.model, tiny.processor, two, config, format_prompt=tiny.format_prompt, statistics=own)
    assert result.recipe.pre_llm == {"method": "g-prune", "keep_ratio": 0.5, "params": {"steps": 3, "temperature": 0.03, "threshold": 0.7}}
    assert abs(result.details["pre_llm_chosen"].flops_fraction - result.verification.flops_fraction) < 1e-9


# ---------------------------------------------------------------------------------- options


@pytest.mark.parametrize("kwargs, message", [
    (dict(pre_llm="fopru-rank", fopru_feature_layer=0), "--fopru-feature-layer must be a non-zero integer"),
    (dict(pre_llm="fopru-rank", fopru_feature_layer=True), "--fopru-feature-layer must be a non-zero integer"),
    (dict(pre_llm="g-prune", fopru_feature_layer=-1), "--fopru-feature-layer applies to --pre-llm fopru-rank, fopru-row or auto"),
    (dict(pre_llm="cls-inflection", inflection_detector="elbow"), "inflection detector 'elbow' is unknown"),
    (dict(pre_llm="fopru-row", inflection_detector="kneedle"), "--inflection-detector applies to --pre-llm cls-inflection or auto"),
])
def test_stage_options_are_validated_in_the_config(kwargs, message):
    from recipe_compiler.compile import CompileConfig

    with pytest.raises(ValueError, match=message):
        CompileConfig(budget=0.5, **kwargs)


@pytest.mark.parametrize("value", [3, -3])
def test_cli_refuses_a_feature_layer_outside_the_encoder_in_one_line(tmp_path, capsys, value):
    from recipe_compiler.cli import compile_main

    out = tmp_path / "r.safetensors"
    code = compile_main(["--model", "tiny-llava", "--samples", "2", "--quiet", "--budget", "0.5", "--pre-llm", "fopru-rank",
                         "--fopru-feature-layer", str(value), "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and not out.exists()
    assert err.strip().count("\n") == 0
    assert f"--fopru-feature-layer {value} is out of range for this 2-layer vision encoder; use 1..2 or -2..-1" in err


def test_fopru_feature_layer_flows_into_statistics_recipe_and_runtime(tiny, tiny_eager, calibration, tmp_path):
    from recipe_compiler.cli import compile_main
    from recipe_compiler.statistics import load_statistics

    out, saved = tmp_path / "r.safetensors", tmp_path / "s.safetensors"
    base = ["--model", "tiny-llava", "--samples", "2", "--quiet", "--budget", "0.5", "--pre-llm", "fopru-rank", "--pre-llm-ratio", "0.5"]
    assert compile_main([*base, "--fopru-feature-layer", "-1", "--save-stats", str(saved), "-o", str(out)]) == 0
    recipe = load(out)
    assert recipe.pre_llm["params"] == {"feature_layer": 2}  # hidden_states[2] = the last of 2 encoder layers
    assert json.loads(load_statistics(saved).prellm_params)["feature_layer"] == 2
    # Reusing those statistics for the default layer (-2, i.e. 1) is refused.
    again = tmp_path / "again.safetensors"
    assert compile_main([*base, "--stats", str(saved), "-o", str(again)]) == 1 and not again.exists()
    assert compile_main([*base, "--fopru-feature-layer", "2", "--stats", str(saved), "-o", str(again)]) == 0

    # The runtime ranks by the CLS row of the eager attention of encoder layer 1, not layer 0.
    model = tiny_eager.model
    inputs = make_inputs(tiny_eager, calibration.samples[:2])
    with torch.no_grad():
        attentions = model.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions
        with recipe.apply(model) as handle:
            model(**inputs)
            selection = handle.last_request.selection
    k = stage_count(0.5, 576)
    for row in range(2):
        visual = torch.nonzero(inputs["input_ids"][row] == model.config.image_token_id).flatten()
        expected = prellm.fopru_rank_keep(prellm.fopru_significance(attentions[1][row]), k)
        other = prellm.fopru_rank_keep(prellm.fopru_significance(attentions[0][row]), k)
        assert torch.equal(selection[0][row], visual[expected])
        assert not torch.equal(expected, other)  # the layer matters


def test_inflection_detector_flows_into_the_recipe_and_the_runtime(tiny, batch2, calibration, stats):
    from recipe_compiler.compile import CompileConfig, compile_recipe

    config = CompileConfig(budget=0.35, pre_llm="cls-inflection", inflection_detector="max-curvature")
    result = compile_recipe(tiny.model, tiny.processor, calibration, config, format_prompt=tiny.format_prompt, statistics=stats)
    assert result.recipe.pre_llm["params"]["inflection_detector"] == "max-curvature"
    chosen = result.details["pre_llm_chosen"]
    assert abs(chosen.flops_fraction - result.verification.flops_fraction) < 1e-9  # planned == measured
    model = tiny.model
    with torch.no_grad():
        hidden, _ = _vision_reference(model, batch2["pixel_values"])
        with result.recipe.apply(model) as handle:
            model(**batch2)
            selection = handle.last_request.selection
    differs = False
    for row in range(2):
        visual = torch.nonzero(batch2["input_ids"][row] == model.config.image_token_id).flatten()
        sim = prellm.cls_similarity(hidden[row, 1:], hidden[row, 0])
        assert torch.equal(selection[0][row], visual[prellm.inflection_keep(sim, "max-curvature")])
        differs |= not torch.equal(prellm.inflection_keep(sim, "max-curvature"), prellm.inflection_keep(sim, "kneedle"))
    assert differs  # the detector changes the selection on these images


def test_stage_only_recipe_generates_with_batch_1_unpadded_and_equals_no_cache_recomputation(tiny, calibration):
    """Batch 1 without padding (how users call it): layer 0 is a pruned layer, and no 2D mask reaches the LM."""
    model = tiny.model
    inputs = make_inputs(tiny, calibration.samples[:1])
    with torch.no_grad(), _stage_recipe(model, "g-prune", counts=[576] * 8).apply(model) as handle:
        generated = model.generate(**inputs, **GREEDY)
        selection = handle.last_request.selection
        worst = 0.0
        with handle.replay(selection):
            for step in range(4):
                length = inputs["input_ids"].shape[1] + step
                logits = model(input_ids=generated.sequences[:, :length], pixel_values=inputs["pixel_values"],
                               use_cache=False).logits[:, -1]
                worst = max(worst, float((logits - generated.logits[step]).abs().max()))
    assert generated.sequences.shape[1] == inputs["input_ids"].shape[1] + 4
    assert worst <= 1e-4

"""Pre-LLM stages on LLaVA-NeXT (per view, newlines survive) and Qwen2-VL (merged tokens, no CLS).

Every layer-0 selection is checked against a reference built here from the model's own pieces
(``get_image_features``, ``pack_image_features``, eager attention probabilities), independently of
the runtime's mapping code. Batches pair two images of different sizes with prompts of different
lengths (left padding), so rows carry different token counts.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from recipe_compiler.calibration import load_image
from runtime import Recipe, RecipeMismatchError, load, prellm
from runtime.families import model_fingerprint
from runtime.prellm import stage_count

GREEDY = dict(max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
SHORT_PROMPT = "Which animal? Answer briefly, please."


def _stage_recipe(model, method, ratio=0.5):
    fp = model_fingerprint(model)
    v, layers = fp["visual_tokens"], model.config.text_config.num_hidden_layers
    if method == "cls-inflection":
        return Recipe(keep_count=np.array([v] * 2 + [v // 2] * (layers - 2)), scorer="text-mean", fingerprint=fp,
                      pre_llm={"method": method, "params": {"stage2_layer": 2, "stage2_ratio": 0.5}})
    params = {"threshold": 0.5, "temperature": 0.03, "steps": 5} if method == "g-prune" else {}
    counts = [v] * layers if ratio == 1.0 else [v, v, v // 2, v // 2] + [v // 4] * (layers - 4)
    return Recipe(keep_count=np.array(counts), scorer="fitprune", fingerprint=fp,
                  pre_llm={"method": method, "keep_ratio": ratio, "params": params})


def _batch(loaded, samples):
    prompts = [loaded.format_prompt(samples[0].prompt), loaded.format_prompt(SHORT_PROMPT)]
    inputs = loaded.processor(images=[load_image(s) for s in samples], text=prompts, return_tensors="pt", padding=True)
    assert (inputs["attention_mask"] == 0).any(), "the batch must be left-padded"
    return inputs


def _run(model, recipe, inputs, generate):
    with torch.no_grad(), recipe.apply(model) as handle:
        out = model.generate(**inputs, **GREEDY) if generate else model(**inputs)
        request = handle.last_request
    return out, request


def _kept_prompt_positions(request, row):
    index, valid = request.kept[0]
    return index[row][valid[row]]


# ---------------------------------------------------------------------------------- LLaVA-NeXT


@pytest.fixture(scope="module")
def nxt():
    from recipe_compiler.models import build_tiny_llava_next

    return build_tiny_llava_next(seed=0, attn_implementation="eager")


@pytest.fixture(scope="module")
def nxt_batch(nxt, calibration):
    return _batch(nxt, [calibration.samples[0], calibration.samples[2]])  # 512x512 and 451x300


def _next_reference(model, inputs):
    """Per row: (placeholder positions, newline flags, packed features, FoPru significance, CLS similarity).

    Per-crop signals come from the eager vision tower and are packed with the model's own
    ``pack_image_features`` (NaN marks the newline rows), exactly as it packs the features.
    """
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    config, base = model.config, model.model
    sizes = inputs["image_sizes"].tolist()
    crops = [image_size_to_num_patches(s, config.image_grid_pinpoints, config.vision_config.image_size) for s in sizes]
    pixels = torch.cat([p[:n] for p, n in zip(inputs["pixel_values"], crops)])
    with torch.no_grad():
        out = base.vision_tower(pixels, output_hidden_states=True, output_attentions=True)
        packed = base.get_image_features(inputs["pixel_values"], inputs["image_sizes"], return_dict=True).pooler_output
    depth = len(base.vision_tower.vision_model.encoder.layers) if hasattr(base.vision_tower, "vision_model") else len(base.vision_tower.encoder.layers)
    hidden_index = config.vision_feature_layer % (depth + 1)
    attn = out.attentions[hidden_index - 1]  # (C, H, T, T) of the layer producing the features
    hidden = out.hidden_states[hidden_index]
    significance = torch.stack([prellm.fopru_significance(a) for a in attn])
    similarity = torch.stack([prellm.cls_similarity(h[1:], h[0]) for h in hidden])
    signal = torch.stack([significance, similarity], dim=-1).double()  # (C, P, 2)
    nan = torch.full((2,), float("nan"), dtype=torch.float64)
    packed_signal, _ = base.pack_image_features(list(torch.split(signal, crops)), sizes, "default", image_newline=nan)
    rows = []
    for row, ids in enumerate(inputs["input_ids"]):
        positions = torch.nonzero(ids == config.image_token_id).flatten()
        values = packed_signal[row]
        newline = torch.isnan(values[:, 0])
        assert len(positions) == len(values) == len(packed[row])
        rows.append((positions, newline, packed[row], values[:, 0].float(), values[:, 1].float()))
    return rows


def _next_views(newline, side=8):
    """(indices into the image's placeholders, grid) of the base view and the high-res view."""
    tokens = torch.nonzero(~newline).flatten()
    base, rest = tokens[: side * side], tokens[side * side:]
    rows = int(newline[side * side:].sum())
    return [(base, (side, side)), (rest, (rows, len(rest) // rows))]


NEXT_METHODS = ["g-prune", "fopru-rank", "fopru-row", "cls-inflection"]


@pytest.mark.parametrize("method", NEXT_METHODS)
def test_next_stage_is_per_view_keeps_newlines_and_order_under_generate_with_batch_2(nxt, nxt_batch, tmp_path, method):
    model = nxt.model
    recipe = load(_stage_recipe(model, method).save(tmp_path / "r.safetensors"))
    assert recipe.pre_llm == _stage_recipe(model, method).pre_llm
    out, request = _run(model, recipe, nxt_batch, generate=True)
    assert out.sequences.shape[1] == nxt_batch["input_ids"].shape[1] + GREEDY["max_new_tokens"]
    _, plain = _run(model, recipe, nxt_batch, generate=False)  # forward() has image_sizes, generate() only features
    reference = _next_reference(model, nxt_batch)
    for row, (positions, newline, features, significance, similarity) in enumerate(reference):
        expected = []
        for index, grid in _next_views(newline):
            k = stage_count(0.5, len(index))
            if method == "g-prune":
                mask = prellm.gprune_keep(features[index], k)
            elif method == "fopru-rank":
                mask = prellm.fopru_rank_keep(significance[index], k)
            elif method == "fopru-row":
                mask = prellm.fopru_row_keep(significance[index], grid, k)
            else:
                mask = prellm.inflection_keep(similarity[index])
            expected.append(positions[index[mask]])
        expected = torch.cat(expected)
        for req in (request, plain):
            assert torch.equal(req.selection[0][row], expected)
            kept = _kept_prompt_positions(req, row)
            assert bool((kept[1:] > kept[:-1]).all())  # kept tokens stay in prompt order
            assert bool(torch.isin(positions[newline], kept).all())  # every row-end newline survives
    counts = [len(request.selection[0][row]) for row in range(2)]
    assert counts[0] != counts[1]  # two image sizes: different survivors per row


@pytest.mark.parametrize("method", ["g-prune", "fopru-rank", "fopru-row"])
def test_next_keep_all_stage_is_bit_identical(nxt, nxt_batch, method):
    model = nxt.model
    with torch.no_grad():
        reference = model(**nxt_batch).logits
        reference_gen = model.generate(**nxt_batch, **GREEDY)
        with _stage_recipe(model, method, ratio=1.0).apply(model) as handle:
            assert handle.policy.pruning_layers[0] == 0
            patched = model(**nxt_batch).logits
            patched_gen = model.generate(**nxt_batch, **GREEDY)
    assert torch.equal(patched, reference)
    assert torch.equal(patched_gen.sequences, reference_gen.sequences)
    assert all(torch.equal(a, b) for a, b in zip(patched_gen.logits, reference_gen.logits))


def test_next_compile_auto_plans_exactly_what_the_runtime_does(nxt, calibration):
    from recipe_compiler.compile import CompileConfig, compile_recipe

    three = calibration.__class__(calibration.samples[:3], "three")
    result = compile_recipe(nxt.model, nxt.processor, three, CompileConfig(budget=0.4, pre_llm="auto"),
                            format_prompt=nxt.format_prompt)
    table = result.details["pre_llm_table"]
    assert all(method in table for method in NEXT_METHODS) and "skipped" not in table
    assert sorted(np.unique(result.statistics.prellm["view"][~np.isnan(result.statistics.prellm["view"])])) == [0.0, 1.0]
    for method in ("fopru-row", "cls-inflection"):  # whole-row and dynamic-count stages, per view
        config = CompileConfig(budget=0.4, pre_llm=method)
        found = compile_recipe(nxt.model, nxt.processor, three, config, format_prompt=nxt.format_prompt, statistics=result.statistics)
        assert found.recipe.pre_llm["method"] == method
        assert abs(found.details["pre_llm_chosen"].flops_fraction - found.verification.flops_fraction) < 1e-9


# ---------------------------------------------------------------------------------- Qwen2-VL


@pytest.fixture(scope="module")
def qwen():
    from recipe_compiler.models import build_tiny_qwen2_vl

    return build_tiny_qwen2_vl(seed=0, attn_implementation="eager")


@pytest.fixture(scope="module")
def qwen_batch(qwen, calibration):
    return _batch(qwen, [calibration.samples[1], calibration.samples[2]])


def _qwen_reference(model, inputs, monkeypatch):
    """Per image: merged features and per-token significance from the eager probabilities.

    Significance: the attention each patch receives at the last vision block, mean over heads and
    query rows (within its image), then the mean over each ``2×2`` merge group.
    """
    from transformers.models.qwen2_vl import modeling_qwen2_vl

    visual = model.model.visual
    target = visual.blocks[-1].attn
    recorded = []
    original = modeling_qwen2_vl.eager_attention_forward

    def recording(module, *args, **kwargs):
        output, weights = original(module, *args, **kwargs)
        if module is target:
            recorded.append(weights[0].mean(dim=(0, 1)))  # (T,) per image chunk
        return output, weights

    monkeypatch.setattr(modeling_qwen2_vl, "eager_attention_forward", recording)
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True).pooler_output
    monkeypatch.setattr(modeling_qwen2_vl, "eager_attention_forward", original)
    merge = model.config.vision_config.spatial_merge_size
    assert len(recorded) == len(features) == 2
    grids = [(t * h // merge, w // merge) for t, h, w in inputs["image_grid_thw"].tolist()]
    return [(f, r.float().view(-1, merge * merge).mean(dim=1), g) for f, r, g in zip(features, recorded, grids)]


QWEN_METHODS = ["g-prune", "fopru-rank", "fopru-row"]


@pytest.mark.parametrize("method", QWEN_METHODS)
def test_qwen_stage_keeps_the_reference_tokens_in_order_under_generate_with_batch_2(qwen, qwen_batch, tmp_path, monkeypatch, method):
    model = qwen.model
    recipe = load(_stage_recipe(model, method).save(tmp_path / "r.safetensors"))
    assert recipe.pre_llm == _stage_recipe(model, method).pre_llm
    out, request = _run(model, recipe, qwen_batch, generate=True)
    assert out.sequences.shape[1] == qwen_batch["input_ids"].shape[1] + GREEDY["max_new_tokens"]
    assert all(torch.isfinite(step).all() for step in out.logits)
    reference = _qwen_reference(model, qwen_batch, monkeypatch)
    for row, (features, significance, grid) in enumerate(reference):
        positions = torch.nonzero(qwen_batch["input_ids"][row] == model.config.image_token_id).flatten()
        assert len(positions) == len(features) == grid[0] * grid[1]
        k = stage_count(0.5, len(positions))
        if method == "g-prune":
            mask = prellm.gprune_keep(features, k)
        elif method == "fopru-rank":
            mask = prellm.fopru_rank_keep(significance, k)
        else:
            mask = prellm.fopru_row_keep(significance, grid, k)
        assert torch.equal(request.selection[0][row], positions[mask])
        kept = _kept_prompt_positions(request, row)
        assert bool((kept[1:] > kept[:-1]).all())
    assert request.visual_per_layer[0].tolist() == [stage_count(0.5, len(f)) for f, _, _ in reference]
    assert reference[0][0].shape[0] != reference[1][0].shape[0]  # two image sizes


@pytest.mark.parametrize("method", ["g-prune", "fopru-rank"])
def test_qwen_keep_all_stage_is_bit_identical(qwen, qwen_batch, method):
    model = qwen.model
    with torch.no_grad():
        reference = model(**qwen_batch).logits
        reference_gen = model.generate(**qwen_batch, **GREEDY)
        with _stage_recipe(model, method, ratio=1.0).apply(model):
            patched = model(**qwen_batch).logits
            patched_gen = model.generate(**qwen_batch, **GREEDY)
    assert torch.equal(patched, reference)
    assert torch.equal(patched_gen.sequences, reference_gen.sequences)
    assert all(torch.equal(a, b) for a, b in zip(patched_gen.logits, reference_gen.logits))


def test_qwen_refuses_cls_inflection_at_apply_and_compile_in_one_line(qwen, tmp_path, capsys):
    from recipe_compiler.cli import compile_main

    from runtime.methods.stages import STAGES
    from runtime.prellm_stage import supported_methods

    wanted = ("pre-LLM stage 'cls-inflection' is not supported on model_type 'qwen2_vl' (its vision encoder has no CLS token); "
              f"use {STAGES.choices(supported_methods(qwen.model))}")
    with pytest.raises(RecipeMismatchError) as raised:
        _stage_recipe(qwen.model, "cls-inflection").apply(qwen.model)
    assert str(raised.value) == f"recipe's pre-LLM stage does not fit this model: {wanted}"
    assert getattr(qwen.model, "_recipe_runtime_handle", None) is None  # nothing left installed
    out = tmp_path / "r.safetensors"
    code = compile_main(["--model", "tiny-qwen2-vl", "--samples", "2", "--quiet", "--budget", "0.5", "--pre-llm", "cls-inflection", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and not out.exists()
    assert err.strip() == f"recipe-compile: error: {wanted}"


def test_qwen_pre_llm_auto_lists_only_supported_stages_and_says_why(qwen, tmp_path, capsys):
    from recipe_compiler.cli import compile_main
    from runtime.methods.stages import STAGES
    from runtime.prellm_stage import supported_methods, unsupported_reason

    out = tmp_path / "r.safetensors"
    code = compile_main(["--model", "tiny-qwen2-vl", "--samples", "3", "--quiet", "--budget", "0.4", "--pre-llm", "auto", "-o", str(out)])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    lines = stdout.strip().splitlines()
    skipped = [line for line in lines if "skipped" in line]
    refused = [m for m in STAGES if m not in supported_methods(qwen.model) and not STAGES[m].baseline]
    assert "cls-inflection" in refused and "g-prune" not in refused
    assert skipped == [f"-{m:<14} skipped: {unsupported_reason(qwen.model, m)}" for m in refused]
    assert all("(its vision encoder has no CLS token)" in line for line in skipped)
    candidates = [m for m in supported_methods(qwen.model) if not STAGES[m].baseline]  # auto never tries random keep
    for method in ("none", *candidates):
        assert any(line[1:].startswith(method + " ") for line in lines[1:-1])
    recipe = load(out)
    assert recipe.pre_llm["method"] in ("none", *supported_methods(qwen.model))
    assert recipe.provenance["flops_fraction"] <= 0.4 * (1 + 1e-9)
    if recipe.pre_llm["method"].startswith("fopru"):
        assert recipe.pre_llm["params"] == {"feature_layer": 2}  # the last of the tiny encoder's 2 blocks


def test_a_feature_layer_beyond_the_encoder_is_a_mismatch_at_apply_and_installs_nothing(qwen):
    recipe = _stage_recipe(qwen.model, "fopru-rank")
    recipe.pre_llm["params"]["feature_layer"] = 7  # the tiny encoder has 2 blocks
    with pytest.raises(RecipeMismatchError, match=r"feature_layer 7 is out of range for this 2-layer vision encoder"):
        recipe.apply(qwen.model)
    assert getattr(qwen.model, "_recipe_runtime_handle", None) is None
    assert not qwen.model.model.visual._forward_pre_hooks

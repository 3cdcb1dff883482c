"""The peer pre-LLM stages (VisionZip, DivPrune, VTC-CLS, PruMerge+) compiled and run as users call them.

Each stage compiles at budgets 0.45 and 0.25 on every built-in family that can express it and
meets the budget on verification with the real runtime (the plan's FLOPs are the measured ones);
a family that cannot (no CLS token, encoder patches that are not tokens) refuses it at compile and at apply in one line naming the
reason. On tiny-llava the runtime's output is checked against the peer math on the vision
tower's own eager outputs (VisionZip's written features, DivPrune's kept set).
"""
from __future__ import annotations

import functools
import re

import numpy as np
import pytest
import torch

from families import FAMILIES
from recipe_compiler.errors import BudgetError
from runtime import Recipe, RecipeMismatchError
from runtime.families import family_for, model_fingerprint
from runtime.methods.stages import STAGES
from runtime.prellm_stage import _stage_reason, unsupported_reason

PEERS = [name for name in ("visionzip", "divprune", "vtc-cls", "prumerge-plus") if name in STAGES]
BUDGETS = (0.45, 0.25)
CASES = {case.name: case for case in FAMILIES}


@functools.lru_cache(maxsize=None)
def _calibration():
    from recipe_compiler.calibration import load_calibration

    return load_calibration(samples=4)


@functools.lru_cache(maxsize=None)
def _statistics(family: str):
    from recipe_compiler.collect import collect_statistics

    loaded = CASES[family].load()
    return collect_statistics(loaded.model, loaded.processor, _calibration(), format_prompt=loaded.format_prompt)


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("method", PEERS)
@pytest.mark.parametrize("family", list(CASES))
def test_each_peer_compiles_at_each_budget_and_meets_it_on_verification(family, method, budget):
    from recipe_compiler.compile import CompileConfig, compile_recipe

    loaded = CASES[family].load()
    reason = unsupported_reason(loaded.model, method)
    config = CompileConfig(budget=budget, pre_llm=method)
    if reason is not None:  # refused with the family's own reason, at compile and at apply
        why = _stage_reason(family_for(loaded.model), STAGES[method])
        assert why and why in reason and method in reason
        with pytest.raises(ValueError, match=re.escape(why)):
            compile_recipe(loaded.model, loaded.processor, _calibration(), config, format_prompt=loaded.format_prompt)
        recipe = Recipe(keep_count=np.full(loaded.model.config.text_config.num_hidden_layers, model_fingerprint(loaded.model)["visual_tokens"]),
                        scorer="fitprune", fingerprint=model_fingerprint(loaded.model),
                        pre_llm={"method": method, "keep_ratio": 0.5, "params": {}} if STAGES[method].fixed_ratio else {"method": method, "params": {}})
        with pytest.raises(RecipeMismatchError, match=re.escape(why)):
            recipe.apply(loaded.model)
        return
    try:
        result = compile_recipe(loaded.model, loaded.processor, _calibration(), config,
                                format_prompt=loaded.format_prompt, statistics=_statistics(family))
    except BudgetError as error:
        # Only a budget the family's prompts cannot reach with any stage may be refused (tiny-internvl's
        # byte tokenizer makes its prompts text-heavy): G-Prune at the same budget is refused too.
        # the floor as a --budget, or (a cut only after attention layers, Qwen3.5) the search's smallest feasible FLOPs
        assert "cannot be met" in str(error) and ("use --budget" in str(error) or "raise the budget" in str(error))
        with pytest.raises(BudgetError, match="cannot be met"):
            compile_recipe(loaded.model, loaded.processor, _calibration(), CompileConfig(budget=budget, pre_llm="g-prune"),
                           format_prompt=loaded.format_prompt, statistics=_statistics(family))
        return
    assert result.recipe.pre_llm["method"] == method
    assert result.verification.flops_fraction <= budget * (1 + 1e-9)
    chosen = result.details["pre_llm_chosen"]
    assert abs(chosen.flops_fraction - result.verification.flops_fraction) < 1e-9  # planned == measured
    unpruned = _statistics(family).n_visual.mean()  # per sample: a tiled family's images exceed the recipe's unit
    assert result.verification.visual_tokens_per_layer[0] < unpruned


def test_auto_includes_the_peer_stages(tiny, calibration):
    from recipe_compiler.compile import CompileConfig, compile_recipe

    three = calibration.__class__(calibration.samples[:3], "three")
    result = compile_recipe(tiny.model, tiny.processor, three, CompileConfig(budget=0.45, pre_llm="auto"), format_prompt=tiny.format_prompt)
    table = result.details["pre_llm_table"]
    for method in PEERS:
        assert method in table


def _tower_reference(model, pixel_values):
    """hidden_states[-2], the CLS row of attentions[-2] summed over heads, and that layer's head-mean keys."""
    tower = model.model.vision_tower
    out = tower(pixel_values, output_hidden_states=True, output_attentions=True)
    layer = tower.vision_model.encoder.layers[-2] if hasattr(tower, "vision_model") else tower.encoder.layers[-2]
    x = layer.layer_norm1(out.hidden_states[-3])
    attn = layer.self_attn
    n, t, d = x.shape
    keys = attn.k_proj(x).view(n, t, d // attn.head_dim, attn.head_dim).mean(dim=2)
    return out.hidden_states[-2], out.attentions[-2][:, :, 0, :], keys


def test_visionzip_writes_the_reference_features_through_the_projector(tiny_eager, calibration):
    from conftest import make_inputs
    from runtime.peer_math import visionzip as vz

    model = tiny_eager.model
    inputs = make_inputs(tiny_eager, calibration.samples[:1])
    fp = model_fingerprint(model)
    recipe = Recipe(keep_count=np.full(fp["num_layers"], fp["visual_tokens"]), scorer="fitprune", fingerprint=fp,
                    pre_llm={"method": "visionzip", "keep_ratio": 64 / 576, "params": {}})
    written = []
    with recipe.apply(model) as handle, torch.no_grad():
        stage = handle.policy.stage
        original = stage.writes
        stage.writes = lambda: written.extend(original()) or list(written)
        model(**inputs)
        hidden, cls, keys = _tower_reference(model, inputs["pixel_values"])
    reference = vz.visionzip(hidden, cls, keys, dominant=54, contextual=10)
    expected = model.model.multi_modal_projector(reference.features[0])
    (row, positions, features), = written
    assert features.shape == (64, expected.shape[-1])
    # placement: CLS first free slot, dominant patches and targets at their own positions; compare as sets of rows
    got = {tuple(np.round(f.numpy(), 4)) for f in features}
    want = {tuple(np.round(f.numpy(), 4)) for f in expected}
    assert got == want
    start = int(torch.nonzero(inputs["input_ids"][0] == model.config.image_token_index)[0])
    patches = positions - start
    assert set((reference.dominant_index[0, 1:] - 1).tolist()) <= set(patches.tolist())
    assert set((reference.contextual_index[0] - 1).tolist()) <= set(patches.tolist())


def test_divprune_keeps_the_greedy_max_min_set_of_the_input_embeddings(tiny, calibration):
    from conftest import make_inputs
    from runtime.peer_math import divprune as dp

    model = tiny.model
    inputs = make_inputs(tiny, calibration.samples[:1])
    fp = model_fingerprint(model)
    recipe = Recipe(keep_count=np.full(fp["num_layers"], fp["visual_tokens"]), scorer="fitprune", fingerprint=fp,
                    pre_llm={"method": "divprune", "keep_ratio": 0.098, "params": {}})
    with recipe.apply(model) as handle, torch.no_grad():
        model(**inputs)
        kept = handle.last_request.selection[0][0]
    with torch.no_grad():
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        image = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]
    _, keep = dp.divprune(image, dp.keep_count(576))
    start = int(torch.nonzero(inputs["input_ids"][0] == model.config.image_token_index)[0])
    assert (kept - start).tolist() == torch.nonzero(keep).flatten().tolist()
    assert embeds is not None


def test_vtc_cls_keeps_the_top_patches_of_the_summed_cls_attention(tiny_eager, calibration):
    from conftest import make_inputs
    from runtime.methods.stages.vtc_cls import start_layer
    from runtime.peer_math import vtc_cls as vtc

    model = tiny_eager.model
    inputs = make_inputs(tiny_eager, calibration.samples[:1])
    fp = model_fingerprint(model)
    recipe = Recipe(keep_count=np.full(fp["num_layers"], fp["visual_tokens"]), scorer="fitprune", fingerprint=fp,
                    pre_llm={"method": "vtc-cls", "keep_ratio": 36 / 576, "params": {}})
    with recipe.apply(model) as handle, torch.no_grad():
        model(**inputs)
        kept = handle.last_request.selection[0][0]
        tower = model.model.vision_tower
        out = tower(inputs["pixel_values"], output_attentions=True)
    depth = len(out.attentions)
    rows = torch.stack([a[:, :, 0, :] for a in out.attentions[start_layer(depth, None):-1]])  # (layers, B, H, 1 + N)
    keep = vtc.select(vtc.scores(rows), 36)[0]
    start = int(torch.nonzero(inputs["input_ids"][0] == model.config.image_token_index)[0])
    assert (kept - start).tolist() == torch.nonzero(keep).flatten().tolist()


def test_prumerge_plus_writes_the_reference_merge_on_an_image_with_outliers(calibration):
    """On tiny-llava-next's random weights some views have IQR outliers (tiny-llava's mostly do not:
    its CLS attention is flat, and such an image passes through unpruned, where the reference divides by zero)."""
    from runtime.methods.stages.prumerge_plus import kept_index

    loaded = CASES["tiny-llava-next"].load()
    model = loaded.model
    from conftest import make_inputs

    inputs = make_inputs(loaded, calibration.samples[:1])
    fp = model_fingerprint(model)
    recipe = Recipe(keep_count=np.full(fp["num_layers"], fp["visual_tokens"]), scorer="fitprune", fingerprint=fp,
                    pre_llm={"method": "prumerge-plus", "params": {}})
    written = []
    with recipe.apply(model) as handle, torch.no_grad():
        stage = handle.policy.stage
        original = stage.writes
        stage.writes = lambda: written.extend(original()) or list(written)
        model(**inputs)
    assert written, "no view had an outlier"
    for _, positions, features in written:
        assert features.shape[0] == positions.numel() >= 2
    assert kept_index(torch.tensor([0.1] * 20)) is None  # flat attention: no outlier, nothing pruned


@pytest.mark.parametrize("method", PEERS)
def test_the_vllm_plugin_refuses_the_peer_stages_it_does_not_compute(tiny, method):
    from runtime import RecipeError
    from runtime.vllm import SERVED_STAGES, overrides

    fp = model_fingerprint(tiny.model)
    spec = {"method": method, "keep_ratio": 0.5, "params": {}} if STAGES[method].fixed_ratio else {"method": method, "params": {}}
    recipe = Recipe(keep_count=np.full(fp["num_layers"], fp["visual_tokens"]), scorer="fitprune", fingerprint=fp, pre_llm=spec)
    with pytest.raises(RecipeError, match=method) as refused:  # PruMerge+ already for its per-image count
        overrides(recipe)
    assert "vLLM" in str(refused.value)
    assert method not in SERVED_STAGES

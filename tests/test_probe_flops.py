"""A scoring probe's FLOPs: the count the budget uses is what the runtime's probe really computes.

Three views of one number on the tiny built-in LLaVA: the count written out by hand from the
model's sizes and the prompt's layout, the FLOPs model's (:func:`recipe_compiler.flops.probe_table`
from each scorer's :meth:`probe_macs`), and torch's own FLOP counter around every
``attention_row_sums`` call of a real pruned prefill. The count is the probe run beside the
stock attention kernel (eager attention, or an SDPA call the fused path does not cover); fused into
the layer's attention it computes less (``tests/test_fused_probe.py``).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import runtime.attention as attention
from conftest import make_inputs
from recipe_compiler.flops import LMShape, probe_flops, probe_table
from runtime import Recipe
from runtime.families import model_fingerprint
from runtime.methods.scorers import SCORERS

def count_flops(monkeypatch, name: str) -> list:
    """Wrap ``runtime.attention.<name>`` for this test; returns the list each call's FLOPs (torch's counter) are appended to."""
    counted = []
    original = getattr(attention, name)

    def counting(*args, **kwargs):
        with FlopCounterMode(display=False) as counter:
            out = original(*args, **kwargs)
        counted.append(counter.get_total_flops())
        return out

    monkeypatch.setattr(attention, name, counting)
    return counted


COUNTS = [576, 576, 300, 300, 120, 120, 40, 40]  # cuts into layers 2, 4 and 6
ROW_SUM_SCORERS = ["fitprune", "text-mean", "last-token", "random"]  # the scorers that read the probe's row sums


def _layout(loaded, sample):
    """(n_tokens, n_before, n_visual, n_text) of one prompt, from its token ids."""
    ids = make_inputs(loaded, [sample])["input_ids"][0]
    image = (ids == loaded.model.config.image_token_id).nonzero().flatten()
    n = ids.numel()
    return n, int(image[0]), image.numel(), n - 1 - int(image[-1])


def test_fitprune_probe_flops_by_hand_match_the_flops_model(tiny, calibration):
    text_config = tiny.model.config.text_config
    heads, head_dim = text_config.num_attention_heads, text_config.head_dim or text_config.hidden_size // text_config.num_attention_heads
    n, before, visual, text = _layout(tiny, calibration.samples[0])
    assert visual == 576 and before > 0 and text > 0
    # The probe on entry to layer 2 sees every token; FitPrune needs the rows from the first visual
    # token to the last, in chunks of 64 rows, each against the keys up to its own last row:
    # QKᵀ (heads·head_dim per row and key) and the two weighted row sums (text, visual).
    by_hand = 0
    for start in range(before, n, 64):
        end = min(start + 64, n)
        by_hand += (end - start) * end * (heads * head_dim + 2)
    by_hand *= 2  # FLOPs per multiply-add
    shape = LMShape.from_config(text_config)
    model_table = probe_table(shape, [n - visual], [visual], 576, SCORERS["fitprune"].probe_macs, [before], [text])
    assert model_table[2, 576] == by_hand
    assert probe_flops(shape, [n - visual], [visual], [576, 576, 300] + [300] * 5, 576, SCORERS["fitprune"].probe_macs,
                       [before], [text]) == by_hand
    # The last-token row: one query against every key.
    last = probe_table(shape, [n - visual], [visual], 576, SCORERS["last-token"].probe_macs, [before], [text])
    assert last[2, 576] == 2 * n * (heads * head_dim + 1)


@pytest.mark.parametrize("scorer", ROW_SUM_SCORERS)
def test_declared_probe_flops_equal_the_flops_torch_counts_in_a_pruned_prefill(tiny, calibration, scorer, monkeypatch):
    model = tiny.model
    counted = count_flops(monkeypatch, "attention_row_sums")
    inputs = make_inputs(tiny, calibration.samples[1:2])
    recipe = Recipe(keep_count=np.array(COUNTS), scorer=scorer, fingerprint=model_fingerprint(model))
    with recipe.apply(model) as handle, torch.no_grad():
        handle.policy.fuse_probe = False  # the probe as a second QKᵀ: what the budget counts (fused, it costs less)
        model(**inputs, use_cache=False)
        request = handle.last_request
    tokens = torch.stack(request.tokens_per_layer, dim=1)[0].numpy()
    visual = torch.stack(request.visual_per_layer, dim=1)[0].numpy()
    before, text = int(request.roles.n_before[0]), int(request.roles.text[0].sum())
    shape = LMShape.from_config(model.config.text_config)
    declared = [2 * SCORERS[scorer].probe_macs(shape, tokens[l - 1], visual[l - 1], before, text) for l in recipe.pruning_layers]
    assert len(counted) == len(recipe.pruning_layers) == 3
    assert counted == pytest.approx(declared, rel=0, abs=0)
    assert all(c > 0 for c in counted)


def test_probe_chunk_is_the_same_on_every_device_for_recipes():
    # The count above is only device-independent if the runtime uses one chunk size for recipes.
    from runtime.pruner import RecipePolicy

    recipe = Recipe(keep_count=np.array(COUNTS), scorer="fitprune",
                    fingerprint={"model_type": "llava", "num_layers": 8, "hidden_size": 64, "num_heads": 4,
                                 "num_kv_heads": 2, "visual_tokens": 576, "config_hash": "0"})
    assert RecipePolicy(recipe).probe_chunk == attention.PROBE_CHUNK == 64


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_every_scorer_that_probes_declares_a_positive_cost(name):
    scorer = SCORERS[name]
    shape = LMShape(num_layers=2, hidden=64, intermediate=128, num_heads=4, num_kv_heads=2, head_dim=16)
    macs = np.asarray(scorer.probe_macs(shape, np.array([700.0, 300.0]), np.array([576.0, 176.0]), np.array([35.0, 35.0]),
                                        np.array([89.0, 89.0])))
    assert macs.shape == (2,)
    if scorer.attention_probe or scorer.input_offsets:
        assert np.all(macs > 0), f"{name} computes something at its pruning layers but declares no cost"
        assert macs[0] > macs[1], "a probe on fewer tokens costs less"
    else:
        assert np.all(macs == 0)


PROTECTED = {"tiny-llava-next", "tiny-llava-onevision"}  # newlines inside the image: FitPrune's span is an upper bound


def _family_params():
    from families import FAMILIES

    return [pytest.param(case, id=case.name) for case in FAMILIES]


@pytest.mark.parametrize("case", _family_params())
@pytest.mark.parametrize("scorer", ["fitprune", "last-token"])
def test_declared_probe_flops_match_torch_on_every_family(case, scorer, calibration, monkeypatch):
    from runtime.families import family_for

    from recipe_compiler.collect import model_inputs

    loaded = case.load()
    model = loaded.model
    fingerprint = model_fingerprint(model)
    v, layers = fingerprint["visual_tokens"], fingerprint["num_layers"]
    cuts = [c for c in family_for(model).cut_layers(model) if c >= 1][:2]
    keep = np.full(layers, v)
    keep[cuts[0]:] = v // 2
    keep[cuts[1]:] = v // 4
    counted = count_flops(monkeypatch, "attention_row_sums")
    inputs = model_inputs(model, loaded.processor, calibration.samples[:1], loaded.format_prompt)
    recipe = Recipe(keep_count=keep, scorer=scorer, fingerprint=fingerprint)
    with recipe.apply(model) as handle, torch.no_grad():
        handle.policy.fuse_probe = False  # the probe as a second QKᵀ: what the budget counts (fused, it costs less)
        model(**inputs, use_cache=False)
        request = handle.last_request
    tokens = torch.stack(request.tokens_per_layer, dim=1)[0].numpy()
    visual = torch.stack(request.visual_per_layer, dim=1)[0].numpy()
    before, text = int(request.roles.n_before[0]), int(request.roles.text[0].sum())
    shape = LMShape.from_config(family_for(model).text_config(model))
    declared = [2 * SCORERS[scorer].probe_macs(shape, tokens[l - 1], visual[l - 1], before, text) for l in recipe.pruning_layers]
    assert len(counted) == len(declared) == 2
    if scorer == "fitprune" and case.name in PROTECTED:
        assert all(0 < c <= d for c, d in zip(counted, declared)), (counted, declared)
    else:
        assert counted == declared

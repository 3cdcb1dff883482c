"""The runtime on a tiny real LLaVA: identity, cache consistency, batches, removal, errors."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from conftest import make_inputs
from runtime import Recipe, RecipeMismatchError
from runtime.log import LOGGER_NAME
from runtime.families import model_fingerprint

GREEDY = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
# Drop visual tokens at three layers (576 → 300 → 120 → 40), so later pruning acts on pruned rows.
PRUNED_COUNTS = [576, 576, 300, 300, 120, 120, 40, 40]


def _models(request, name):
    return request.getfixturevalue(name)


def _pruned_recipe(model, scorer="fitprune", counts=PRUNED_COUNTS):
    return Recipe(keep_count=np.array(counts), scorer=scorer, fingerprint=model_fingerprint(model))


def _hooks(model):
    """Every forward (pre-)hook on the model (transformers registers some of its own)."""
    return {(name, kind, key) for name, m in model.named_modules() for kind, hooks in
            (("pre", m._forward_pre_hooks), ("post", m._forward_hooks)) for key in hooks}


@pytest.mark.parametrize("model_name", ["tiny", "tiny_eager"])
@pytest.mark.parametrize("batch", [1, 2])
def test_keep_all_recipe_is_bit_identical_at_prefill_and_every_decode_step(request, calibration, model_name, batch):
    loaded = _models(request, model_name)
    model = loaded.model
    inputs = make_inputs(loaded, calibration.samples[:batch])
    if batch == 2:
        assert (inputs["attention_mask"] == 0).any(), "the batch must be left-padded for this test"
    with torch.no_grad():
        reference = model(**inputs).logits
        reference_gen = model.generate(**inputs, **GREEDY)
        with Recipe.keep_all(model_fingerprint(model)).apply(model):
            patched = model(**inputs).logits
            patched_gen = model.generate(**inputs, **GREEDY)
    assert torch.equal(patched, reference)
    assert torch.equal(patched_gen.sequences, reference_gen.sequences)
    assert len(patched_gen.logits) == 6
    for step, (a, b) in enumerate(zip(patched_gen.logits, reference_gen.logits)):
        assert torch.equal(a, b), f"decode step {step} differs"


@pytest.mark.parametrize("model_name", ["tiny", "tiny_eager"])
@pytest.mark.parametrize("batch", [1, 2])
def test_pruned_cached_generation_equals_no_cache_recomputation(request, calibration, model_name, batch):
    loaded = _models(request, model_name)
    model = loaded.model
    inputs = make_inputs(loaded, calibration.samples[2 : 2 + batch])
    recipe = _pruned_recipe(model)
    with recipe.apply(model) as handle, torch.no_grad():
        generated = model.generate(**inputs, **GREEDY)
        selection = handle.last_request.selection
        worst = 0.0
        with handle.replay(selection):
            for step in range(6):
                length = inputs["input_ids"].shape[1] + step
                mask = torch.cat([inputs["attention_mask"], torch.ones(batch, step, dtype=torch.long)], dim=1)
                logits = model(
                    input_ids=generated.sequences[:, :length],
                    attention_mask=mask,
                    pixel_values=inputs["pixel_values"],
                    position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                    use_cache=False,
                ).logits[:, -1]
                worst = max(worst, float((logits - generated.logits[step]).abs().max()))
    assert worst <= 1e-4

    # Each layer's cache holds what the recipe implies: all real prompt tokens minus the dropped
    # visual ones (padding is dropped at the first pruning layer), plus the 5 fed-back tokens.
    cache = generated.past_key_values
    prompt = inputs["input_ids"].shape[1]
    real = inputs["attention_mask"].sum(dim=1)
    for layer, keep in enumerate(PRUNED_COUNTS):
        length = cache.layers[layer].keys.shape[2]
        if layer < 2:
            expected = prompt + 5
        else:
            expected = int((real - 576 + keep).max()) + 5
        assert length == expected, f"layer {layer}: cache holds {length}, recipe implies {expected}"


def test_ragged_keep_counts_in_one_batch_match_each_sample_alone(tiny, calibration):
    """Two images in one prompt scale the recipe's ratios to 1152 tokens: rows keep different counts."""
    from recipe_compiler.calibration import load_image

    model = tiny.model
    two = tiny.format_prompt(calibration.samples[0].prompt).replace("<image>", "<image><image>")
    one = tiny.format_prompt(calibration.samples[1].prompt)
    images = [load_image(calibration.samples[0]), load_image(calibration.samples[3]), load_image(calibration.samples[1])]
    batch = tiny.processor(images=images, text=[two, one], return_tensors="pt", padding=True)
    alone = [
        tiny.processor(images=images[:2], text=[two], return_tensors="pt"),
        tiny.processor(images=images[2:], text=[one], return_tensors="pt"),
    ]
    recipe = _pruned_recipe(model)
    with recipe.apply(model) as handle, torch.no_grad():
        together = model.generate(**batch, **GREEDY)
        kept = {layer: [len(row) for row in rows] for layer, rows in handle.last_request.selection.items()}
        singles = [model.generate(**a, **GREEDY) for a in alone]
    assert kept[2] == [600, 300] and kept[6] == [80, 40]
    for row, single in enumerate(singles):
        for step in range(6):
            assert torch.allclose(together.logits[step][row], single.logits[step][0], atol=1e-4)


@pytest.mark.parametrize("scorer", ["fitprune", "text-mean", "last-token"])
def test_every_scorer_prunes_and_generates(tiny, calibration, scorer):
    inputs = make_inputs(tiny, calibration.samples[:2])
    with _pruned_recipe(tiny.model, scorer).apply(tiny.model) as handle, torch.no_grad():
        out = tiny.model.generate(**inputs, **GREEDY)
        visual = torch.stack(handle.last_request.visual_per_layer, dim=1)
    assert out.sequences.shape[1] == inputs["input_ids"].shape[1] + 6
    assert visual[0].tolist() == PRUNED_COUNTS and visual[1].tolist() == PRUNED_COUNTS


def test_text_only_prompt_passes_through_unpruned_and_says_so_once(tiny, caplog):
    model = tiny.model
    inputs = tiny.processor.tokenizer(["USER: hello there ASSISTANT:"], return_tensors="pt")
    with torch.no_grad():
        reference = model.generate(**inputs, **GREEDY)
        with caplog.at_level(logging.INFO, logger=LOGGER_NAME), _pruned_recipe(model).apply(model):
            first = model.generate(**inputs, **GREEDY)
            second = model.generate(**inputs, **GREEDY)
    assert torch.equal(first.sequences, reference.sequences) and torch.equal(second.sequences, reference.sequences)
    messages = [r for r in caplog.records if "no image tokens" in r.getMessage()]
    assert len(messages) == 1
    assert messages[0].name == "recipe_compiler.runtime"  # named after the package, not the generic "runtime"


def test_remove_restores_the_model_exactly(tiny, calibration):
    model = tiny.model
    inputs = make_inputs(tiny, calibration.samples[:1])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = _hooks(model)
    implementation = model.config.text_config._attn_implementation
    with torch.no_grad():
        before = model(**inputs).logits
        handle = _pruned_recipe(model).apply(model)
        pruned = model(**inputs).logits
        handle.remove()
        handle.remove()  # idempotent
        after = model(**inputs).logits
    assert pruned.shape[1] < before.shape[1]
    assert torch.equal(before, after)
    assert model.config.text_config._attn_implementation == implementation
    assert _hooks(model) == hooks
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_applying_twice_is_refused_until_removed(tiny):
    recipe = _pruned_recipe(tiny.model)
    with recipe.apply(tiny.model):
        with pytest.raises(RuntimeError, match="already has a pruning recipe"):
            recipe.apply(tiny.model)
    recipe.apply(tiny.model).remove()


@pytest.mark.parametrize(
    "field, value",
    [("num_layers", 32), ("hidden_size", 4096), ("visual_tokens", 64), ("config_hash", "0123456789abcdef"), ("model_type", "qwen2_vl")],
)
def test_recipe_for_another_model_is_refused_naming_the_field(tiny, field, value):
    fingerprint = dict(model_fingerprint(tiny.model), **{field: value})
    counts = np.full(fingerprint["num_layers"], fingerprint["visual_tokens"])
    recipe = Recipe(keep_count=counts, scorer="fitprune", fingerprint=fingerprint)
    hooks = _hooks(tiny.model)
    with pytest.raises(RecipeMismatchError, match=field):
        recipe.apply(tiny.model)
    assert _hooks(tiny.model) == hooks


def test_dtype_and_attention_implementation_do_not_change_the_fingerprint(tiny, tiny_eager):
    assert model_fingerprint(tiny.model) == model_fingerprint(tiny_eager.model)

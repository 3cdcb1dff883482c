"""Runtime edge cases: prompts, batches, caches and handle lifecycles the runtime must not get wrong.

Each case either prunes exactly per the recipe (checked against the unpruned model or a no-cache
recomputation with the same keep sets) or passes the request through unpruned and says so once.
"""
from __future__ import annotations

import functools
import logging

import numpy as np
import pytest
import torch

from conftest import make_inputs
from recipe_compiler.calibration import load_image
from runtime import Recipe
from runtime.log import LOGGER_NAME
from runtime.families import model_fingerprint
from runtime import RecipeAlreadyAppliedError

STEPS = 4
GREEDY = dict(max_new_tokens=STEPS, do_sample=False, output_logits=True, return_dict_in_generate=True)
# tiny-llava: 576 visual tokens per image, dropped at layers 2, 4 and 6.
PRUNED = [576, 576, 300, 300, 120, 120, 40, 40]
OTHER = [576, 400, 400, 400, 200, 200, 100, 100]  # a second recipe with other layers and counts
TEXT_PROMPTS = ["USER: hello there, what is up today? ASSISTANT:", "USER: hi ASSISTANT:"]


def _recipe(model, counts=PRUNED):
    return Recipe(keep_count=np.array(counts), scorer="fitprune", fingerprint=model_fingerprint(model))


def _hooks(model):
    return {(name, kind, key) for name, m in model.named_modules() for kind, hooks in
            (("pre", m._forward_pre_hooks), ("post", m._forward_hooks)) for key in hooks}


def _said(caplog, fragment):
    return [r.getMessage() for r in caplog.records if r.name == LOGGER_NAME and fragment in r.getMessage()]


def _cache_lengths(cache):
    return [layer.keys.shape[2] for layer in cache.layers]


def _expected_lengths(recipe, real, n_visual, new_tokens):
    """Per-layer cache length a recipe implies: the longest row's real tokens after pruning + fed-back tokens."""
    counts = [recipe.keep_counts_for(n) for n in n_visual]
    return [max(r - n + int(c[layer]) for r, n, c in zip(real, n_visual, counts)) + new_tokens
            for layer in range(recipe.num_layers)]


def _worst_recompute_gap(model, handle, inputs, generated, selection, steps):
    """Largest |Δlogit| between cached generation and no-cache forwards with the same keep sets."""
    worst = 0.0
    batch = inputs["input_ids"].shape[0]
    with handle.replay(selection):
        for step in range(steps):
            length = inputs["input_ids"].shape[1] + step
            mask = torch.cat([inputs["attention_mask"], torch.ones(batch, step, dtype=torch.long)], dim=1)
            logits = model(
                input_ids=generated.sequences[:, :length], attention_mask=mask, pixel_values=inputs["pixel_values"],
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=False,
            ).logits[:, -1]
            worst = max(worst, float((logits - generated.logits[step]).abs().max()))
    return worst


# ------------------------------------------------------------------------------- text-only prompts


@pytest.mark.parametrize("model_name", ["tiny", "tiny_eager"])
@pytest.mark.parametrize("batch", [1, 2])
def test_text_only_prompts_run_bit_identical_to_the_unpruned_model_and_say_so_once(request, caplog, model_name, batch):
    loaded = request.getfixturevalue(model_name)
    model = loaded.model
    inputs = loaded.processor.tokenizer(TEXT_PROMPTS[:batch], return_tensors="pt", padding=True)
    with torch.no_grad():
        reference = model.generate(**inputs, **GREEDY)
        with caplog.at_level(logging.INFO, logger=LOGGER_NAME), _recipe(model).apply(model) as handle:
            runs = [model.generate(**inputs, **GREEDY) for _ in range(3)]
            assert handle.last_request is None
    for run in runs:
        assert torch.equal(run.sequences, reference.sequences)
        assert all(torch.equal(a, b) for a, b in zip(run.logits, reference.logits))
    assert len(_said(caplog, "no image tokens")) == 1


# ------------------------------------------------------------------------------- families

# Where each family's prompt template puts the image; removing it gives the same prompt without one.
IMAGE_SLOT = {"llava": "<image>\n", "llava_next": "<image>\n", "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>"}


@functools.lru_cache(maxsize=None)
def _built(family):
    from recipe_compiler.models import build_tiny_llava_next
    from recipe_compiler.models import build_tiny_qwen2_vl

    return {"llava_next": build_tiny_llava_next, "qwen2_vl": build_tiny_qwen2_vl}[family](seed=0)


def _loaded(request, family):
    return request.getfixturevalue("tiny") if family == "llava" else _built(family)


def _scaled_recipe(model):
    """Drops at layers 2, 4 and 6, in proportion to the family's reference image."""
    v = model_fingerprint(model)["visual_tokens"]
    return _recipe(model, [v, v, v * 5 // 8, v * 5 // 8, v // 4, v // 4, 7, 7])


def _visual_counts(loaded, inputs):
    """Prunable tokens per row, found without the runtime: image placeholders minus the row-end
    newlines LLaVA-NeXT inserts (recognised in the language model's input as the newline vector)."""
    placeholders = inputs["input_ids"] == loaded.model.config.image_token_id
    newline = getattr(loaded.model.model, "image_newline", None)
    if newline is None:
        return placeholders.sum(dim=1).tolist()
    captured = {}

    def capture(module, args, kwargs):
        captured["embeds"] = kwargs["inputs_embeds"]

    hook = loaded.model.model.language_model.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            loaded.model(**inputs)
    finally:
        hook.remove()
    is_newline = (captured["embeds"] == newline).all(dim=-1) & placeholders
    return (placeholders.sum(dim=1) - is_newline.sum(dim=1)).tolist()


# ------------------------------------------------------------------------------- mixed batch


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
@pytest.mark.parametrize("image_row", [0, 1])
def test_mixed_batch_prunes_the_image_row_as_alone_and_leaves_the_text_row_unpruned(
    request, calibration, family, image_row
):
    loaded = _loaded(request, family)
    model = loaded.model
    sample = calibration.samples[2]
    image_prompt = loaded.format_prompt(sample.prompt)
    text_prompt = loaded.format_prompt("hello there, what is up today?").replace(IMAGE_SLOT[family], "")
    prompts = [image_prompt, text_prompt] if image_row == 0 else [text_prompt, image_prompt]
    mixed = loaded.processor(images=[load_image(sample)], text=prompts, return_tensors="pt", padding=True)
    assert (mixed["attention_mask"] == 0).any(), "the batch must be left-padded"
    image_alone = loaded.processor(images=[load_image(sample)], text=[image_prompt], return_tensors="pt")
    text_alone = loaded.processor.tokenizer([text_prompt], return_tensors="pt")
    assert not (text_alone["input_ids"] == model.config.image_token_id).any()
    recipe = _scaled_recipe(model)
    n_visual = _visual_counts(loaded, mixed)
    with torch.no_grad():
        text_reference = model.generate(**text_alone, **GREEDY)
        with recipe.apply(model) as handle:
            together = model.generate(**mixed, **GREEDY)
            visual = torch.stack(handle.last_request.visual_per_layer, dim=1)
            image_pruned = model.generate(**image_alone, **GREEDY)
    text_row = 1 - image_row
    assert n_visual[text_row] == 0 and n_visual[image_row] > 0
    assert visual[image_row].tolist() == recipe.keep_counts_for(n_visual[image_row]).tolist()
    assert visual[text_row].tolist() == [0] * recipe.num_layers
    assert torch.equal(together.sequences[image_row, -STEPS:], image_pruned.sequences[0, -STEPS:])
    assert torch.equal(together.sequences[text_row, -STEPS:], text_reference.sequences[0, -STEPS:])
    for step in range(STEPS):
        assert torch.allclose(together.logits[step][image_row], image_pruned.logits[step][0], atol=1e-5)
        assert torch.allclose(together.logits[step][text_row], text_reference.logits[step][0], atol=1e-5)
    real = mixed["attention_mask"].sum(dim=1).tolist()  # NeXT's newlines count as real, never pruned
    assert _cache_lengths(together.past_key_values) == _expected_lengths(recipe, real, n_visual, STEPS - 1)


# ------------------------------------------------------------------------------- several images


def test_two_images_in_one_prompt_scale_the_schedule_to_their_total_and_stay_cache_consistent(tiny, calibration):
    """The recipe's ratios apply to the prompt's visual total (ranked jointly across its images)."""
    model = tiny.model
    prompt = tiny.format_prompt(calibration.samples[0].prompt).replace("<image>", "<image><image>")
    inputs = tiny.processor(images=[load_image(calibration.samples[0]), load_image(calibration.samples[3])],
                            text=[prompt], return_tensors="pt")
    n_visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert n_visual == 2 * 576 and inputs["pixel_values"].shape[0] == 2
    recipe = _recipe(model)
    with recipe.apply(model) as handle, torch.no_grad():
        generated = model.generate(**inputs, **GREEDY)
        visual = torch.stack(handle.last_request.visual_per_layer, dim=1)[0].tolist()
        gap = _worst_recompute_gap(model, handle, inputs, generated, handle.last_request.selection, STEPS)
    assert visual == recipe.keep_counts_for(n_visual).tolist() == [2 * c for c in PRUNED]
    assert gap <= 1e-4
    expected = _expected_lengths(recipe, [inputs["input_ids"].shape[1]], [n_visual], STEPS - 1)
    assert _cache_lengths(generated.past_key_values) == expected


# ------------------------------------------------------------------------------- other token counts


@pytest.mark.parametrize("family, samples", [("llava_next", (0, 2)), ("qwen2_vl", (1, 2))])
def test_images_with_other_token_counts_keep_exactly_keep_counts_for_n(calibration, family, samples):
    loaded = _built(family)
    model = loaded.model
    reference = model_fingerprint(model)["visual_tokens"]
    recipe = _scaled_recipe(model)
    inputs = make_inputs(loaded, [calibration.samples[i] for i in samples])
    n_visual = _visual_counts(loaded, inputs)
    assert any(n != reference for n in n_visual), "the test needs an image of a non-reference size"
    with recipe.apply(model) as handle, torch.no_grad():
        model.generate(**inputs, **GREEDY)
        visual = torch.stack(handle.last_request.visual_per_layer, dim=1).tolist()
        kept = {layer: [len(rows) for rows in per_row] for layer, per_row in handle.last_request.selection.items()}
    for row, n in enumerate(n_visual):
        expected = recipe.keep_counts_for(n).tolist()
        assert visual[row] == expected
        layers = recipe.pruning_layers
        assert [kept[layer][row] for layer in layers] == [expected[layer] for layer in layers]
        if n != reference:
            assert expected != recipe.keep_count.tolist()  # the schedule was really rescaled


# ------------------------------------------------------------------------------- beam search


def test_beam_search_prunes_every_beam_alike_and_equals_no_cache_beams_with_the_same_keep_sets(tiny, calibration):
    model = tiny.model
    inputs = make_inputs(tiny, calibration.samples[:2])
    beams = dict(num_beams=3, num_return_sequences=2, max_new_tokens=3, do_sample=False,
                 return_dict_in_generate=True, output_scores=True)
    recipe = _recipe(model)
    with recipe.apply(model) as handle, torch.no_grad():
        model.generate(**inputs, **GREEDY)
        greedy_selection = handle.last_request.selection
        cached = model.generate(**inputs, **beams)
        selection = handle.last_request.selection
        with handle.replay(selection):
            recomputed = model.generate(**inputs, use_cache=False, **beams)
    for layer, rows in selection.items():
        assert len(rows) == 2 * 3
        for row, kept in enumerate(rows):
            assert torch.equal(kept, greedy_selection[layer][row // 3]), f"layer {layer}, beam row {row}"
    sources = cached.beam_indices[:, 1:]  # -1 pads finished sequences
    assert ((sources >= 0) & (sources % 3 != 0)).any(), "no beam was reordered; the case is not exercised"
    assert torch.equal(cached.sequences, recomputed.sequences)
    assert torch.allclose(cached.sequences_scores, recomputed.sequences_scores, atol=1e-4)
    real = inputs["attention_mask"].sum(dim=1).repeat_interleave(3).tolist()
    expected = _expected_lengths(recipe, real, [576] * 6, 3 - 1)
    assert _cache_lengths(cached.past_key_values) == expected


# ------------------------------------------------------------------------------- static cache


@pytest.mark.parametrize("how", ["generate", "forward"])
def test_static_cache_passes_through_bit_identical_to_unpruned_and_says_so_once(tiny, calibration, caplog, how):
    """Fixed-size cache layers cannot hold pruned layers' shorter sequences: never prune into them."""
    from transformers import StaticCache

    model = tiny.model
    inputs = make_inputs(tiny, calibration.samples[:2])

    def run():
        if how == "generate":
            out = model.generate(**inputs, cache_implementation="static", **GREEDY)
            return [out.sequences.float(), *out.logits]
        cache = StaticCache(config=model.config.text_config, max_cache_len=inputs["input_ids"].shape[1] + 2)
        first = model(**inputs, past_key_values=cache, use_cache=True)
        token = first.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(token)], dim=1)
        second = model(input_ids=token, attention_mask=mask, past_key_values=first.past_key_values,
                       position_ids=mask.sum(dim=1, keepdim=True) - 1, use_cache=True)
        return [first.logits, second.logits]

    with torch.no_grad():
        reference = run()
        with caplog.at_level(logging.INFO, logger=LOGGER_NAME), _recipe(model).apply(model) as handle:
            patched = [run(), run()]
            assert handle.last_request is None
    for outputs in patched:
        assert all(torch.equal(a, b) for a, b in zip(outputs, reference))
    assert len(_said(caplog, "StaticCache")) == 1


# ------------------------------------------------------------------------------- chunked prefill


def test_chunked_prefill_that_splits_the_image_passes_through_bit_identical_and_says_so_once(tiny, calibration, caplog):
    model = tiny.model
    inputs = make_inputs(tiny, calibration.samples[:1])
    image = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    chunk = int(image[0]) + 100  # the first chunk ends inside the image
    with torch.no_grad():
        reference = model.generate(**inputs, prefill_chunk_size=chunk, **GREEDY)
        with caplog.at_level(logging.INFO, logger=LOGGER_NAME), _recipe(model).apply(model):
            runs = [model.generate(**inputs, prefill_chunk_size=chunk, **GREEDY) for _ in range(2)]
    for run in runs:
        assert torch.equal(run.sequences, reference.sequences)
        assert all(torch.equal(a, b) for a, b in zip(run.logits, reference.logits))
        assert len(set(_cache_lengths(run.past_key_values))) == 1  # nothing pruned in any layer
    assert len(_said(caplog, "ends with image tokens")) == 1


@pytest.mark.parametrize("how", ["generate", "two forwards"])
def test_chunked_prefill_after_the_image_prunes_per_recipe_and_equals_recomputing_the_whole_prompt(
    tiny, calibration, caplog, how
):
    """Chunks after the image attend to the kept tokens, chosen at the first chunk (and logged once)."""
    model = tiny.model
    inputs = make_inputs(tiny, calibration.samples[:1])
    length = inputs["input_ids"].shape[1]
    image = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    split = int(image[-1]) + 8  # the first chunk holds the whole image and a little text
    assert split < length - 1
    recipe = _recipe(model)
    with caplog.at_level(logging.INFO, logger=LOGGER_NAME), recipe.apply(model) as handle, torch.no_grad():
        if how == "generate":
            generated = model.generate(**inputs, prefill_chunk_size=split, **GREEDY)
            selection = handle.last_request.selection
            gap = _worst_recompute_gap(model, handle, inputs, generated, selection, STEPS)
            cache, new = generated.past_key_values, STEPS - 1
        else:
            first = model(input_ids=inputs["input_ids"][:, :split], pixel_values=inputs["pixel_values"], use_cache=True)
            selection = handle.last_request.selection
            second = model(input_ids=inputs["input_ids"][:, split:], past_key_values=first.past_key_values,
                           use_cache=True)
            with handle.replay(selection):
                whole = model(**inputs, use_cache=False).logits  # pruned rows are gone: text is at the end
            gap = float((second.logits - whole[:, -second.logits.shape[1]:]).abs().max())
            cache, new = second.past_key_values, 0
    layers = recipe.pruning_layers
    assert [len(selection[layer][0]) for layer in layers] == [PRUNED[layer] for layer in layers]
    assert gap <= 1e-4
    assert _cache_lengths(cache) == _expected_lengths(recipe, [length], [576], new)
    assert len(_said(caplog, "fed onto a pruned prompt")) == 1


# ------------------------------------------------------------------------------- handle lifecycle


def test_applying_twice_is_refused_with_a_typed_error_and_the_first_handle_keeps_working(tiny, calibration):
    model = tiny.model
    inputs = make_inputs(tiny, calibration.samples[:2])
    with torch.no_grad(), _recipe(model).apply(model):
        before = model.generate(**inputs, **GREEDY)
        hooks = _hooks(model)
        for second in (_recipe(model), _recipe(model, OTHER), Recipe.keep_all(model_fingerprint(model))):
            with pytest.raises(RecipeAlreadyAppliedError, match=r"call remove\(\)"):
                second.apply(model)
        assert _hooks(model) == hooks
        after = model.generate(**inputs, **GREEDY)
    assert issubclass(RecipeAlreadyAppliedError, RuntimeError)
    assert torch.equal(after.sequences, before.sequences)
    assert all(torch.equal(a, b) for a, b in zip(after.logits, before.logits))
    assert _cache_lengths(after.past_key_values) == _cache_lengths(before.past_key_values)


def test_removing_twice_is_a_no_op_even_after_another_recipe_was_applied(tiny, calibration):
    model = tiny.model
    inputs = make_inputs(tiny, calibration.samples[:2])
    hooks = _hooks(model)
    implementation = model.config.text_config._attn_implementation
    with torch.no_grad():
        unpatched = model.generate(**inputs, **GREEDY)
        with _recipe(model, OTHER).apply(model):
            other_alone = model.generate(**inputs, **GREEDY)
        first = _recipe(model).apply(model)
        pruned = model.generate(**inputs, **GREEDY)
        first.remove()
        first.remove()
        assert _hooks(model) == hooks and model.config.text_config._attn_implementation == implementation
        restored = model.generate(**inputs, **GREEDY)
        second = _recipe(model, OTHER).apply(model)
        try:
            first.remove()  # a stale handle must not unhook the live one
            other = model.generate(**inputs, **GREEDY)
        finally:
            second.remove()
    assert _cache_lengths(pruned.past_key_values) != _cache_lengths(unpatched.past_key_values)
    assert torch.equal(restored.sequences, unpatched.sequences)
    assert all(torch.equal(a, b) for a, b in zip(restored.logits, unpatched.logits))
    assert torch.equal(other.sequences, other_alone.sequences)
    assert all(torch.equal(a, b) for a, b in zip(other.logits, other_alone.logits))
    assert _hooks(model) == hooks and model.config.text_config._attn_implementation == implementation


def test_two_models_with_two_recipes_prune_independently_when_interleaved(tiny, tiny_eager, calibration):
    inputs = make_inputs(tiny, calibration.samples[:2])
    models = {"a": tiny.model, "b": tiny_eager.model}
    recipes = {"a": _recipe(tiny.model, PRUNED), "b": _recipe(tiny_eager.model, OTHER)}
    real = inputs["attention_mask"].sum(dim=1).tolist()
    with torch.no_grad():
        unpatched_a = models["a"].generate(**inputs, **GREEDY)
        alone = {}
        for key in models:
            with recipes[key].apply(models[key]):
                alone[key] = models[key].generate(**inputs, **GREEDY)
        handles = {key: recipes[key].apply(models[key]) for key in models}
        try:
            runs = [(key, models[key].generate(**inputs, **GREEDY)) for key in ("a", "b", "a", "b")]
            handles["a"].remove()
            after_a = models["a"].generate(**inputs, **GREEDY)
            after_b = models["b"].generate(**inputs, **GREEDY)
        finally:
            for handle in handles.values():
                handle.remove()
    for key, run in [*runs, ("b", after_b)]:
        assert torch.equal(run.sequences, alone[key].sequences), key
        assert all(torch.equal(x, y) for x, y in zip(run.logits, alone[key].logits)), key
        expected = _expected_lengths(recipes[key], real, [576, 576], STEPS - 1)
        assert _cache_lengths(run.past_key_values) == expected, key
    assert torch.equal(after_a.sequences, unpatched_a.sequences)
    assert all(torch.equal(x, y) for x, y in zip(after_a.logits, unpatched_a.logits))

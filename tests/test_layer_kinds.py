"""The pruner core on a model whose decoder layers differ in kind (Gemma 3: sliding and global attention).

A family that declares both kinds (``Family.layer_kinds``) gets, per kind, its own rebuilt mask
(``Family.layer_mask``: sliding-window layers keep their window, counted in slots of the pruned
sequence), its own gathered ``(cos, sin)`` (Gemma 3's local and global RoPE differ) and its cache
layers (``DynamicSlidingWindowLayer`` keeps the last ``window − 1`` of what it was given). Checked
on a tiny random Gemma 3 (family ``gemma3``): keep-all is
bit-identical under generate on a left-padded batch, and a pruned generate equals a no-cache
recomputation with the same keep sets.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from runtime import Recipe
from runtime.families import FAMILIES
from test_unsupported_models import _gemma3

IMAGE, BOI, EOI = 299, 297, 298


@pytest.fixture
def gemma3():
    return _gemma3()


def _inputs():
    rows = [[5] * 3 + [BOI] + [IMAGE] * 4 + [EOI] + list(range(10, 30)), [5] + [BOI] + [IMAGE] * 4 + [EOI] + list(range(10, 22))]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    torch.manual_seed(1)
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=(ids == IMAGE).long(), pixel_values=torch.randn(2, 3, 32, 32))


def _generate(model, inputs):
    return model.generate(**inputs, max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_logits=True)


def test_both_kinds_and_a_window_shorter_than_the_prompt(gemma3):
    text = gemma3.config.text_config
    assert set(text.layer_types) == {"sliding_attention", "full_attention"}
    assert text.sliding_window < _inputs()["input_ids"].shape[1]


@torch.no_grad()
def test_keep_all_is_bit_identical_on_a_padded_batch(gemma3):
    inputs = _inputs()
    reference = _generate(gemma3, inputs)
    with Recipe.keep_all(FAMILIES["gemma3"].fingerprint(gemma3)).apply(gemma3):
        output = _generate(gemma3, inputs)
    assert torch.equal(output.sequences, reference.sequences)
    assert all(torch.equal(a, b) for a, b in zip(output.logits, reference.logits))


@torch.no_grad()
def test_pruned_generate_equals_recomputation_and_sliding_caches_keep_their_window(gemma3):
    inputs = _inputs()
    recipe = Recipe(keep_count=np.array([4, 2, 2, 1, 1, 1]), scorer="fitprune", fingerprint=FAMILIES["gemma3"].fingerprint(gemma3))
    window = gemma3.config.text_config.sliding_window
    with recipe.apply(gemma3) as handle:
        output = _generate(gemma3, inputs)
        request = handle.last_request
        assert torch.stack(request.visual_per_layer, 1).tolist() == [[4, 2, 2, 1, 1, 1]] * 2
        prompt = inputs["input_ids"].shape[1]
        fed = output.sequences.shape[1] - prompt - 1
        for layer, (cache, kind) in enumerate(zip(output.past_key_values.layers, gemma3.config.text_config.layer_types)):
            width = prompt if layer == 0 else prompt - (4 - int(recipe.keep_count[layer]))  # rows are left-padded alike
            expected = min(width + fed, window - 1) if kind == "sliding_attention" else width + fed
            assert cache.keys.shape[2] == expected, f"layer {layer} ({kind})"
        sequences = output.sequences[:, :-1]
        extra = sequences.shape[1] - prompt
        mask = torch.cat([inputs["attention_mask"], torch.ones(2, extra, dtype=torch.long)], 1)
        kinds = torch.cat([inputs["token_type_ids"], torch.zeros(2, extra, dtype=torch.long)], 1)
        positions = gemma3._prepare_position_ids_for_generation(sequences, {"attention_mask": mask})
        with handle.replay(request.selection):
            logits = gemma3(input_ids=sequences, attention_mask=mask, token_type_ids=kinds, pixel_values=inputs["pixel_values"],
                            position_ids=positions, use_cache=False).logits
    steps = extra + 1
    for step in range(steps):
        assert float((logits[:, -steps:][:, step] - output.logits[step]).abs().max()) <= 1e-4


def _layer_inputs(model, seen: dict):
    def hook(module, args, kwargs):
        seen[module.layer_idx] = (kwargs["attention_mask"], kwargs["position_embeddings"])
    return [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in model.model.language_model.layers]


@torch.no_grad()
def test_masks_and_rope_after_pruning_are_the_models_own_on_the_explicitly_pruned_prompt(gemma3):
    """Padded batch, pruned on entry to layer 1: every later layer's mask (sliding window and bidirectional
    kept-image blocks) and (cos, sin) equal what the model builds for the prompt holding only the kept tokens."""
    inputs = _inputs()
    positions = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    recipe = Recipe(keep_count=np.array([4, 3, 3, 3, 3, 3]), scorer="fitprune", fingerprint=FAMILIES["gemma3"].fingerprint(gemma3))
    pruned: dict = {}
    with recipe.apply(gemma3) as handle:
        hooks = _layer_inputs(gemma3, pruned)  # after the recipe's hooks: sees what the layers are given
        try:
            gemma3(**inputs, position_ids=positions, use_cache=False)
        finally:
            for hook in hooks:
                hook.remove()
        index, valid = handle.last_request.kept[1]
    ids = inputs["input_ids"].gather(1, index)
    explicit = dict(inputs_embeds=gemma3.model.get_input_embeddings()(torch.where(ids == IMAGE, 0, ids)),
                    attention_mask=inputs["attention_mask"].gather(1, index) * valid, token_type_ids=(ids == IMAGE).long() * valid,
                    position_ids=positions.gather(1, index), use_cache=False)
    own: dict = {}
    hooks = _layer_inputs(gemma3, own)
    try:
        gemma3.model(**explicit)
    finally:
        for hook in hooks:
            hook.remove()
    real = valid[:, :, None] & valid[:, None, :]  # re-padding dummies' own rows/columns are not compared
    for layer in range(1, len(gemma3.model.language_model.layers)):
        (mask, (cos, sin)), (want, (want_cos, want_sin)) = pruned[layer], own[layer]
        assert torch.equal(mask[:, 0] & real, want[:, 0] & real), f"layer {layer}: mask differs"
        assert torch.equal(cos, want_cos.expand_as(cos)) and torch.equal(sin, want_sin.expand_as(sin)), f"layer {layer}: RoPE differs"


@torch.no_grad()
def test_kept_image_tokens_still_attend_to_each_other_both_ways(gemma3):
    """Fails if the rebuilt mask is plain causal: an earlier kept image token sees a later one of its image."""
    inputs = _inputs()
    recipe = Recipe(keep_count=np.array([4, 3, 3, 3, 3, 3]), scorer="fitprune", fingerprint=FAMILIES["gemma3"].fingerprint(gemma3))
    seen: dict = {}
    with recipe.apply(gemma3) as handle:
        hooks = _layer_inputs(gemma3, seen)
        try:
            gemma3(**inputs, use_cache=False)
        finally:
            for hook in hooks:
                hook.remove()
        index, valid = handle.last_request.kept[1]
    image = (inputs["input_ids"].gather(1, index) == IMAGE) & valid
    for layer in (1, 5):  # a sliding and the global layer
        mask = seen[layer][0]
        for row in range(image.shape[0]):
            slots = torch.nonzero(image[row]).flatten()
            assert slots.numel() == 3
            assert bool(mask[row, 0, slots[0], slots[-1]]), f"layer {layer}: kept image block is causal only"

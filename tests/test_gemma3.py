"""Gemma 3 end to end: the embedded checkpoints' shapes, the built-in ``tiny-gemma3``, and the FLOPs model's
sliding-window and image-block terms against the masks the layers are really given.

The pruner core on Gemma 3's two layer kinds is in ``tests/test_layer_kinds.py``; the production matrix,
FLOPs-vs-counter and nested-divergence suites run ``tiny-gemma3`` through ``tests/families.py``.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from recipe_compiler.families import ALIASES, config_from_dict, lm_shape
from recipe_compiler.flops import LMShape, attention_pairs, stack_flops
from runtime import Recipe
from runtime.families import FAMILIES


@pytest.fixture(scope="module")
def tiny():
    from recipe_compiler.models import load_model

    return load_model("tiny-gemma3", seed=0)


@pytest.mark.parametrize("alias, layers, full, hidden", [("gemma-3-4b-it", 34, 5, 2560), ("gemma-3-12b-it", 48, 8, 3840)])
def test_embedded_checkpoints_have_five_sliding_layers_to_each_global_one(alias, layers, full, hidden):
    config = config_from_dict(ALIASES[alias].config)
    shape = LMShape.from_config(config.text_config, bidirectional_visual=FAMILIES["gemma3"].bidirectional_visual)
    assert (shape.num_layers, shape.hidden, shape.head_dim) == (layers, hidden, 256)
    assert shape.kinds.count("full_attention") == full and shape.kinds.count("sliding_attention") == layers - full
    assert shape.sliding_window == 1024 and shape.bidirectional_visual
    assert FAMILIES["gemma3"].reference_visual_tokens(config) == 256


def test_window_and_image_block_pairs_by_hand():
    shape = LMShape(3, 2, 3, 1, 1, 2, layer_kinds=("sliding_attention", "full_attention", "sliding_attention"), sliding_window=3,
                    bidirectional_visual=True)
    # 6 tokens, 4 of them visual: causal 21 pairs; window 3: 1 + 2 + 3 + 3 + 3 + 3 = 15; the image block adds 4·3/2 = 6
    assert attention_pairs(shape, [6, 6, 6], [4, 4, 4]).tolist() == [21.0, 27.0, 21.0]
    flops = stack_flops(shape, [6, 6, 6], [4, 4, 4])
    projections, pair, _ = shape.layer_terms()
    assert flops.tolist() == (projections * 6 + pair * np.array([21.0, 27.0, 21.0])).tolist()
    with pytest.raises(ValueError, match="visual_per_layer"):
        stack_flops(shape, [6, 6, 6])


@torch.no_grad()
def test_the_flops_model_counts_the_pairs_each_layer_is_allowed_to_attend(tiny):
    """One unpadded request, pruned twice: each layer's mask (sliding window, bidirectional kept image) holds exactly the
    query–key pairs the FLOPs model counts for the tokens that entered it."""
    from recipe_compiler.calibration import load_calibration, load_image

    model = tiny.model
    sample = load_calibration(samples=1).samples[0]
    inputs = tiny.processor(images=[load_image(sample)], text=[tiny.format_prompt(sample.prompt)], return_tensors="pt")
    v = FAMILIES["gemma3"].reference_visual_tokens(model.config)
    recipe = Recipe(keep_count=np.array([v, v, 160, 160, 160, 40, 40, 40]), scorer="fitprune", fingerprint=FAMILIES["gemma3"].fingerprint(model))
    masks: dict = {}

    def hook(module, args, kwargs):
        masks[module.layer_idx] = kwargs["attention_mask"]

    with recipe.apply(model) as handle:
        hooks = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in model.model.language_model.layers]
        try:
            model(**inputs, use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        request = handle.last_request
    tokens = torch.stack(request.tokens_per_layer, 1)[0].numpy()
    visual = torch.stack(request.visual_per_layer, 1)[0].numpy()
    assert visual.tolist() == [v, v, 160, 160, 160, 40, 40, 40]
    shape = lm_shape(model)
    assert shape.sliding_window < tokens.min()  # the window matters on every layer
    counted = [int(masks[layer].bool().sum()) for layer in range(shape.num_layers)]
    assert counted == attention_pairs(shape, tokens, visual).astype(int).tolist()


def test_compile_meets_the_budget_and_refuses_cls_stages_with_the_reason(tiny):
    from recipe_compiler.calibration import load_calibration
    from recipe_compiler.compile import CompileConfig, compile_recipe

    calibration = load_calibration(samples=4)
    result = compile_recipe(tiny.model, tiny.processor, calibration, CompileConfig(0.45, batch_size=2), format_prompt=tiny.format_prompt)
    assert result.verification.flops_fraction <= 0.45 + 1e-9
    assert result.recipe.fingerprint["model_type"] == "gemma3"
    with pytest.raises(ValueError, match="no CLS token"):
        compile_recipe(tiny.model, tiny.processor, calibration, CompileConfig(0.45, pre_llm="cls-inflection", batch_size=2),
                       format_prompt=tiny.format_prompt)


@pytest.mark.parametrize("seed", range(4))
def test_the_direct_sliding_mask_equals_transformers_composition(tiny, seed):
    # The pruner builds a pruned prefill's sliding-layer mask without transformers' vmap path; it
    # must be the very tensor create_causal_mask gives for AND(window, OR(causal, image block)) and padding.
    from transformers.masking_utils import blockwise_overlay, create_causal_mask, sliding_window_overlay

    from runtime.families.gemma3 import block_ids, sliding_block_mask

    generator = torch.Generator().manual_seed(seed)
    config = tiny.model.model.language_model.config
    batch, length, window = 3, 40 + seed * 7, config.sliding_window
    token_types = (torch.rand(batch, length, generator=generator) < 0.5).long()
    token_types[:, :3] = 0  # text first, as in a prompt
    padding = torch.ones(batch, length, dtype=torch.bool)
    padding[1, :seed + 2] = False  # left padding in one row
    blocks = block_ids(token_types * padding)
    hidden = torch.zeros(batch, length, config.hidden_size)
    expected = create_causal_mask(config, hidden, padding, None, position_ids=None, or_mask_function=blockwise_overlay(blocks),
                                  and_mask_function=sliding_window_overlay(window))
    assert window < length and torch.equal(sliding_block_mask(blocks, padding, window), expected)

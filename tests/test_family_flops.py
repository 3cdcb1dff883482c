"""Every family's FLOPs model against torch's FLOP counter, on its tiny built-in (driven by ``families.FAMILIES``).

* vision: the compiler family's per-prompt encoder + projector FLOPs
  (``vision_flops_per_row`` on the processor's real inputs, two prompts with images of two sizes)
  equal what ``torch.utils.flop_counter`` counts in ``get_image_features`` with eager attention,
  exactly;
* language model: the linear terms of :func:`recipe_compiler.flops.layer_flops` (q/k/v/o and the
  gated MLP) equal the counted matrix products of the decoder layers, exactly (the counter takes
  attention as non-causal ``n²``; ours is causal, so attention is checked in its own unit tests).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from families import FamilyCase, family_params


def _inputs(case: FamilyCase, loaded) -> dict:
    from recipe_compiler.calibration import load_calibration, load_image

    samples = load_calibration().samples
    images = [load_image(samples[i]).resize(size, Image.BICUBIC) for i, size in zip((0, 3), case.image_sizes)]
    texts = [loaded.format_prompt("What is in the picture?"), loaded.format_prompt("Count?")]
    return dict(loaded.processor(images=images, text=texts, return_tensors="pt", padding=True))


@pytest.mark.parametrize("case", family_params())
def test_vision_flops_equal_the_flop_counter(case: FamilyCase):
    from torch.utils.flop_counter import FlopCounterMode

    from recipe_compiler.families import FAMILIES, vision_shape
    from runtime.families import family_for

    loaded = case.load("eager")
    model = loaded.model
    inputs = _inputs(case, loaded)
    image_kwargs = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.model.get_image_features(**image_kwargs)
    compiler = FAMILIES[model.config.model_type]
    ours = compiler.vision_flops_per_row(model, inputs, vision_shape(model.config), family_for(model).image_token_id(model))
    assert len(ours) == 2 and min(ours) > 0
    assert float(np.sum(ours)) == pytest.approx(counter.get_total_flops(), rel=1e-12)


@pytest.mark.parametrize("case", family_params())
def test_language_model_linear_flops_equal_the_flop_counter(case: FamilyCase):
    from torch.utils.flop_counter import FlopCounterMode

    from recipe_compiler.flops import LMShape, layer_flops
    from runtime.families import family_for

    model = case.load("eager").model
    family = family_for(model)
    shape = LMShape.from_config(family.text_config(model))
    n = 37
    embeds = torch.randn(1, n, shape.hidden)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        family.language_model(model)(inputs_embeds=embeds, use_cache=False)
    counts = counter.get_flop_counts()["Global"]
    linear = sum(v for op, v in counts.items() if str(op).split(".")[1] in ("mm", "addmm"))
    attention = 2 * shape.num_heads * shape.head_dim * n * (n + 1)  # the causal score + value terms of layer_flops
    # A linear-attention layer's matrix products by its weights: all its terms but the conv and the state update.
    conv = (2 * shape.linear_key_heads * shape.linear_key_dim + shape.linear_value_heads * shape.linear_value_dim) * shape.linear_conv_kernel
    state = 3 * shape.linear_value_heads * shape.linear_key_dim * shape.linear_value_dim
    # Attention layers of either kind (full, sliding window) have the same projections and MLP.
    per_layer = [2 * n * (shape.linear_macs_per_token - conv - state) if kind == "linear_attention" else layer_flops(shape, n) - attention
                 for kind in shape.kinds]
    assert linear == sum(per_layer)
    projections, _, _ = shape.layer_terms()
    assert linear == float(np.sum(projections * n)) - sum(2 * n * (conv + state) for kind in shape.kinds if kind == "linear_attention")

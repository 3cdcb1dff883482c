"""Qwen3.5: Gated-DeltaNet (linear attention) layers beside full-attention layers.

What a user relies on: a recipe never probes a layer without attention (refused at ``apply()``,
and the compiler only offers cuts after attention layers), the FLOPs model counts a linear layer
exactly as stated (projections and conv against ``torch.utils.flop_counter``; the delta-rule
update against a recurrence written as matrix products and checked to be the model's own), and a
compiled recipe verifies within its budget. Keep-all, cached ≡ recomputed and KV lengths per cache
layer kind are in the production matrix (``tests/test_matrix.py``, case ``tiny-qwen3.5``).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from families import FAMILIES
from recipe_compiler.flops import LMShape, stack_flops
from runtime import Recipe, RecipeMismatchError
from runtime.families import family_for, model_fingerprint

CASE = next(case for case in FAMILIES if case.name == "tiny-qwen3.5")


def _hooks(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_cuts_follow_the_attention_layers_of_the_tiny_and_the_real_layout():
    from recipe_compiler.families import ALIASES, config_from_dict

    model = CASE.load().model
    family = family_for(model)
    assert family.attention_layers(model) == (1, 3, 5, 7)
    assert family.cut_layers(model) == (2, 4, 6)
    config = config_from_dict(ALIASES["qwen3.5-0.8b"].config)
    assert config.text_config.layer_types.count("linear_attention") == 18
    shape = LMShape.from_config(config.text_config)
    assert shape.kinds[:4] == ("linear_attention",) * 3 + ("full_attention",) and shape.gated_attention


def test_a_recipe_probing_a_linear_layer_is_refused_at_apply_with_the_allowed_cuts():
    model = CASE.load().model
    fp = model_fingerprint(model)
    counts = np.array([256, 128, 128, 128, 128, 128, 128, 128])  # cut on entry to layer 1: scores from linear layer 0
    before = _hooks(model)
    with pytest.raises(RecipeMismatchError, match=r"layer 1, whose scores come from layer 0, a linear_attention layer.*2, 4, 6"):
        Recipe(keep_count=counts, scorer="fitprune", fingerprint=fp).apply(model)
    assert _hooks(model) == before and getattr(model, "_recipe_runtime_handle", None) is None
    with Recipe(keep_count=np.array([256, 256, 128, 128, 64, 64, 64, 64]), scorer="fitprune", fingerprint=fp).apply(model):
        pass  # the same counts entering layers 2 and 4 apply


def test_linear_layer_projections_and_conv_match_the_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    model = CASE.load("eager").model
    shape = LMShape.from_config(model.config.text_config)
    layer = family_for(model).layers(model)[0]
    assert layer.block_type == "linear_attention"
    n = 29
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        layer.linear_attn(torch.randn(1, n, shape.hidden))
    counts = counter.get_flop_counts()
    prefix = next(name for name in counts if name != "Global" and "." not in name)  # the module called (its class name)
    submodules = {name.rsplit(".", 1)[-1]: sum(v.values()) for name, v in counts.items()
                  if name.startswith(prefix + ".") and name.count(".") == 1}
    conv_dim = 2 * shape.linear_key_heads * shape.linear_key_dim + shape.linear_value_heads * shape.linear_value_dim
    d, hv, dv = shape.hidden, shape.linear_value_heads, shape.linear_value_dim
    projections = 2 * n * (d * conv_dim + d * hv * dv + 2 * d * hv + hv * dv * d)
    conv = sum(v for op, v in counts[prefix].items() if "convolution" in str(op))  # the functional causal conv
    assert conv == 2 * conv_dim * shape.linear_conv_kernel * (n + shape.linear_conv_kernel - 1)  # K−1 padded outputs discarded
    assert sum(submodules.values()) == projections
    # The model's count: projections, the conv's n kept outputs, the state update and the MLP.
    state = 2 * n * 3 * hv * shape.linear_key_dim * dv
    mlp = 2 * n * 3 * d * shape.intermediate
    assert stack_flops(shape, np.full(shape.num_layers, n))[0] == projections + 2 * n * conv_dim * shape.linear_conv_kernel + state + mlp


def test_the_state_update_count_is_three_state_sized_products_per_token_and_head():
    """The delta rule written as matrix products (our reference) is the model's recurrence, and costs 3·dk·dv MACs per token and head."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers.models.qwen3_5.modeling_qwen3_5 import torch_recurrent_gated_delta_rule

    torch.manual_seed(0)
    n, heads, dk, dv = 5, 2, 4, 3
    q, k = torch.nn.functional.normalize(torch.randn(2, 1, n, heads, dk), dim=-1)
    v = torch.randn(1, n, heads, dv)
    g, beta = -torch.rand(1, n, heads), torch.rand(1, n, heads)
    expected, _ = torch_recurrent_gated_delta_rule(q, k, v, g=g, beta=beta, initial_state=None, output_final_state=False,
                                                   use_qk_l2norm_in_kernel=False)
    state = torch.zeros(heads, dk, dv)
    out = torch.empty(1, n, heads, dv)
    with FlopCounterMode(display=False) as counter:
        for t in range(n):
            state = state * g[0, t].exp()[:, None, None]  # decay: elementwise, not counted
            for h in range(heads):
                read = k[0, t, h][None] @ state[h]  # kᵀS
                state[h] = state[h] + k[0, t, h][:, None] @ (beta[0, t, h] * (v[0, t, h] - read[0]))[None]
                out[0, t, h] = ((q[0, t, h] * dk**-0.5)[None] @ state[h])[0]
    assert torch.allclose(out, expected, atol=1e-6)
    assert counter.get_total_flops() == 2 * 3 * n * heads * dk * dv


def test_a_linear_layer_is_counted_by_hand():
    s = LMShape(num_layers=2, hidden=2, intermediate=3, num_heads=1, num_kv_heads=1, head_dim=2,
                layer_kinds=("linear_attention", "full_attention"), linear_key_heads=1, linear_value_heads=1,
                linear_key_dim=2, linear_value_dim=2, linear_conv_kernel=2)
    # per token: qkv 2·6 + z 2·2 + a,b 2·2·1 + conv 6·2 + state 3·2·2 + out 2·2 + MLP 3·2·3 = 66 MACs
    assert s.linear_macs_per_token == 66
    assert stack_flops(s, [3, 3]).tolist() == [2 * 66 * 3, 2 * (3 * 34 + 2 * 3 * 4)]  # full: 2·[n·34 + qd·n(n+1)]
    assert stack_flops(s, [0, 1]).tolist() == [0.0, 76.0]


def test_a_compiled_recipe_cuts_only_after_attention_layers_and_verifies_within_budget():
    from recipe_compiler.calibration import load_calibration
    from recipe_compiler.compile import CompileConfig, compile_recipe

    loaded = CASE.load()
    result = compile_recipe(loaded.model, loaded.processor, load_calibration(samples=4), CompileConfig(budget=0.6),
                            format_prompt=loaded.format_prompt)
    keep = np.asarray(result.recipe.keep_count)
    cuts = [int(l) for l in np.nonzero(np.diff(keep) < 0)[0] + 1]
    assert cuts and set(cuts) <= {2, 4, 6}
    assert result.verification.flops_fraction <= 0.6 + 1e-9


def test_kv_bytes_counts_every_state_a_linear_attention_cache_holds():
    # Qwen3.5's cache mixes full-attention layers (keys, values) with linear-attention ones (a conv
    # state and a recurrent state, no keys): recipe-eval and the bench report the bytes of both.
    from recipe_compiler.evaluate import kv_bytes

    loaded = CASE.load()
    text = loaded.processor.tokenizer("a short prompt", return_tensors="pt")
    with torch.no_grad():
        cache = loaded.model(**text, use_cache=True).past_key_values
    by_hand = 0
    for layer in cache.layers:
        for name in ("keys", "values", "conv_states", "recurrent_states"):
            value = getattr(layer, name, None)
            by_hand += value.nbytes if isinstance(value, torch.Tensor) else 0
    assert any(getattr(layer, "recurrent_states", None) is not None for layer in cache.layers)
    assert kv_bytes(cache) == by_hand > 0

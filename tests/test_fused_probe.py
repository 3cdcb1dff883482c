"""The fused probe: a probed SDPA layer's attention computed from the probe's own softmax rows.

A pruning layer's scorer sums attention rows of the layer before it; recomputing them costs a second
``QKᵀ`` (about 2.5 % of a pruned prefill per probe on the mid model). Fused, the layer's attention
is those rows times the values. What a user relies on: the scores equal the unfused probe's to
float rounding (the same keep sets on these models), the generated tokens and logits are the stock
kernel's to float rounding, and a call the fused path does not cover keeps the stock kernel.
"""
from __future__ import annotations

import pytest
import torch

from families import family_params
from runtime import attention
from runtime.attention import attention_row_sums, attention_with_row_sums, fusable
from test_attention_probe import padded_case
from test_matrix import _inputs, recipe_kinds
from test_probe_flops import count_flops

CASES = [
    # name, batch, heads, kv_heads, length, left padding of sample 1, mask kind, chunk, dtype
    ("plain causal, no mask", 1, 4, 4, 23, 0, "none", 128, torch.float32),
    ("boolean mask, padded", 2, 4, 4, 23, 5, "bool", 128, torch.float32),
    ("additive mask, padded", 2, 4, 4, 23, 5, "float", 128, torch.float32),
    ("GQA 8/2, boolean", 2, 8, 2, 31, 3, "bool", 128, torch.float32),
    ("GQA, one-row chunks", 2, 8, 2, 17, 4, "bool", 1, torch.float32),
    ("uneven chunks", 1, 6, 3, 29, 0, "none", 5, torch.float32),
    ("bf16 model", 1, 4, 2, 40, 0, "none", 16, torch.bfloat16),
    ("GQA 6/2, additive mask, uneven chunks", 2, 6, 2, 27, 4, "float", 5, torch.float32),
    ("GQA 6/3, per-head boolean mask", 2, 6, 3, 21, 3, "bool-heads", 4, torch.float32),
]


@pytest.mark.parametrize("head_reduce", ["max", "mean"])
@pytest.mark.parametrize("name,batch,heads,kv_heads,length,pad,mask_kind,chunk,dtype", CASES, ids=[c[0] for c in CASES])
def test_fused_sums_are_the_probes_and_output_is_sdpas(name, batch, heads, kv_heads, length, pad, mask_kind, chunk,
                                                        dtype, head_reduce):
    generator = torch.Generator().manual_seed(1)
    query, key, value = (torch.randn(batch, h, length, 8, generator=generator).to(dtype) for h in (heads, kv_heads, kv_heads))
    valid, allowed, mask, weights = padded_case(batch, length, pad, mask_kind, heads)

    output, sums = attention_with_row_sums(query, key, value, mask, 0.3, weights, head_reduce, chunk=chunk)

    torch.testing.assert_close(sums, attention_row_sums(query, key, mask, 0.3, weights, head_reduce, chunk=chunk),
                               rtol=1e-5, atol=1e-6)  # the same rows; spans from row 0, so the summing order may differ
    repeat = heads // kv_heads
    expected = torch.nn.functional.scaled_dot_product_attention(
        query.double(), key.double().repeat_interleave(repeat, 1), value.double().repeat_interleave(repeat, 1),
        attn_mask=allowed, scale=0.3).transpose(1, 2)
    assert output.dtype == dtype and output.shape == (batch, length, heads, 8)
    real = valid[:, :, None, None].expand_as(expected)  # a padding row's output is never read
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(output.double()[real], expected[real], rtol=tolerance, atol=tolerance)


class _Module(torch.nn.Module):
    is_causal = True


@pytest.mark.parametrize("why,change", [
    ("soft-capping", lambda c: c["kwargs"].update(softcap=30.0)),
    ("attention sinks", lambda c: c["kwargs"].update(s_aux=torch.zeros(4))),
    ("dropout in training", lambda c: (c["module"].train(), c["kwargs"].update(dropout=0.1))),
    ("a non-causal call", lambda c: c["kwargs"].update(is_causal=False)),
    ("a cache prefix (keys longer than queries)", lambda c: c.update(key=torch.randn(1, 2, 12, 8), value=torch.randn(1, 2, 12, 8))),
    ("one query row", lambda c: c.update(query=torch.randn(1, 4, 1, 8), key=torch.randn(1, 2, 1, 8), value=torch.randn(1, 2, 1, 8))),
    ("a 2D mask", lambda c: c.update(mask=torch.ones(1, 10, dtype=torch.bool))),
])
def test_calls_the_fused_path_does_not_cover_keep_the_stock_kernel(why, change):
    call = {"module": _Module().eval(), "query": torch.randn(1, 4, 10, 8), "key": torch.randn(1, 2, 10, 8),
            "value": torch.randn(1, 2, 10, 8), "mask": None, "kwargs": {"dropout": 0.0, "scaling": 0.3}}
    assert fusable(call["module"], call["query"], call["key"], call["value"], call["mask"], call["kwargs"])
    change(call)
    assert not fusable(call["module"], call["query"], call["key"], call["value"], call["mask"], call["kwargs"]), why


def _generate(model, inputs, recipe, fuse: bool):
    handle = recipe.apply(model)
    try:
        handle.policy.fuse_probe = fuse
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                                 output_logits=True)
        return out, handle.last_request.selection
    finally:
        handle.remove()


@pytest.mark.parametrize("shape", ["b1-greedy8", "b2padded-greedy8"])
@pytest.mark.parametrize("case", family_params())
def test_fused_generate_keeps_the_same_tokens_as_the_stock_kernel(case, shape, monkeypatch):
    model = case.load().model
    inputs = _inputs(case, shape)
    recipe = recipe_kinds(case)["schedule-fitprune"]
    fused_calls = []
    real = attention.attention_with_row_sums
    monkeypatch.setattr(attention, "attention_with_row_sums", lambda *a, **k: fused_calls.append(1) or real(*a, **k))

    stock, stock_selection = _generate(model, inputs, recipe, fuse=False)
    assert not fused_calls
    fused, fused_selection = _generate(model, inputs, recipe, fuse=True)

    assert fused_calls, f"{case.name}: no probed layer took the fused path"
    assert stock_selection.keys() == fused_selection.keys()
    for layer in stock_selection:
        for a, b in zip(stock_selection[layer], fused_selection[layer]):
            assert torch.equal(a, b), f"{case.name}: keep set of layer {layer} differs"
    assert torch.equal(stock.sequences, fused.sequences)
    for a, b in zip(stock.logits, fused.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_a_fused_probe_computes_no_more_than_the_attention_plus_the_probe_the_budget_counts(tiny, calibration, monkeypatch):
    # The budget counts each probe as a second QKᵀ beside the layer's own causal attention
    # (QKᵀ and P·V over the causal triangle); the fused call does both in one, so its FLOPs (torch's
    # counter; it counts CPU SDPA as 0, hence the triangle written out) must stay under that sum.
    import numpy as np

    from conftest import make_inputs
    from recipe_compiler.flops import LMShape
    from runtime import Recipe
    from runtime.families import model_fingerprint
    from runtime.methods.scorers import SCORERS

    model = tiny.model
    counted = count_flops(monkeypatch, "attention_with_row_sums")
    recipe = Recipe(keep_count=np.array([576, 576, 300, 300, 120, 120, 40, 40]), scorer="fitprune",
                    fingerprint=model_fingerprint(model))
    with recipe.apply(model) as handle, torch.no_grad():
        model(**make_inputs(tiny, calibration.samples[1:2]), use_cache=False)
        request = handle.last_request
    tokens = torch.stack(request.tokens_per_layer, dim=1)[0].numpy()
    visual = torch.stack(request.visual_per_layer, dim=1)[0].numpy()
    before, text = int(request.roles.n_before[0]), int(request.roles.text[0].sum())
    shape = LMShape.from_config(model.config.text_config)
    assert len(counted) == len(recipe.pruning_layers) == 3
    for layer, fused in zip(recipe.pruning_layers, counted):
        n = int(tokens[layer - 1])
        probe = 2 * SCORERS["fitprune"].probe_macs(shape, n, visual[layer - 1], before, text)
        causal_attention = 2 * 2 * shape.num_heads * shape.head_dim * n * (n + 1) / 2
        # What fusing adds to the layer's attention (the staircase of 64-row spans over the triangle,
        # the weighted sums): on this 640-token prompt under half the probe's count (about 0.49).
        assert fused - causal_attention <= 0.6 * probe

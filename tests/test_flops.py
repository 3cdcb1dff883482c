"""Exact prefill FLOPs (DESIGN.md §4): the numbers a user's budget is measured in."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from recipe_compiler.flops import (
    LMShape,
    cost_table,
    layer_flops,
    min_feasible_budget,
    prefill_flops,
    scale_counts,
    schedule_flops_fraction,
    visual_token_equivalent,
)

# d = 8, m = 16, 2 query heads sharing 1 key/value head of width 4 (GQA).
TINY = LMShape(num_layers=3, hidden=8, intermediate=16, num_heads=2, num_kv_heads=1, head_dim=4)
TINY_MHA = LMShape(num_layers=3, hidden=8, intermediate=16, num_heads=2, num_kv_heads=2, head_dim=4)
LLAMA_7B = LMShape(num_layers=32, hidden=4096, intermediate=11008, num_heads=32, num_kv_heads=32, head_dim=128)


def test_layer_flops_by_hand():
    # Per token (multiply-adds): q 8·8 = 64, k 8·4 = 32, v 8·4 = 32, o 8·8 = 64, MLP 3·8·16 = 384
    # → 576. Causal attention, n = 3: scores and values each h·hd·n(n+1)/2 = 8·3·4/2 = 48 → 96.
    # Total 3·576 + 96 = 1824 MACs = 3648 FLOPs.
    assert layer_flops(TINY, 3) == 3648.0
    assert layer_flops(TINY, 0) == 0.0
    # n = 1: 576 + 2·8·1 = 592 MACs.
    assert layer_flops(TINY, 1) == 1184.0


def test_layer_flops_is_vectorised_float64():
    n = np.array([[0, 1], [3, 7]])
    out = layer_flops(TINY, n)
    assert out.dtype == np.float64 and out.shape == (2, 2)
    assert out.tolist() == [[layer_flops(TINY, int(x)) for x in row] for row in n]
    assert isinstance(layer_flops(TINY, 5), float)


def test_gqa_reduces_only_the_key_value_projections():
    n = np.arange(1, 50)
    saved = layer_flops(TINY_MHA, n) - layer_flops(TINY, n)
    # k and v projections: 2 · d · (h - kv) · hd multiply-adds per token, 2 FLOPs each.
    np.testing.assert_array_equal(saved, 2 * 2 * 8 * (2 - 1) * 4 * n)


def test_attention_term_is_causal_and_quadratic():
    n = np.arange(1, 200)
    f = layer_flops(LLAMA_7B, n)
    # f = a·n + b·n² with b = 2·h·hd (QKᵀ and AV over n(n+1)/2 query-key pairs each).
    second_difference = f[2:] - 2 * f[1:-1] + f[:-2]
    np.testing.assert_allclose(second_difference, 2 * 2 * 32 * 128, rtol=0, atol=1e-3)
    # 7B layer: 4·d² + 3·d·m projections per token.
    expected_600 = 2 * (600 * (4 * 4096**2 + 3 * 4096 * 11008) + 4096 * 600 * 601)
    assert layer_flops(LLAMA_7B, 600) == float(expected_600)


def test_layer_flops_grows_with_tokens():
    f = layer_flops(LLAMA_7B, np.arange(0, 3000))
    assert np.all(np.diff(f) > 0)


def test_layer_flops_rejects_negative_counts():
    with pytest.raises(ValueError, match="non-negative"):
        layer_flops(TINY, -1)


def test_prefill_flops_sums_layers():
    assert prefill_flops(TINY, [3, 1, 0]) == 3648.0 + 1184.0
    with pytest.raises(ValueError, match="one count per layer"):
        prefill_flops(TINY, [3, 1])


@pytest.mark.parametrize(
    "k, n_visual, v_ref, expected",
    [
        (1, 6, 4, 2),  # 1.5 rounds half up
        (3, 6, 4, 5),  # 4.5 → 5
        (2, 6, 4, 3),
        (576, 2304, 576, 2304),
        (0, 2304, 576, 0),
        (1, 1, 3, 0),  # 0.33 → 0
    ],
)
def test_scale_counts_rounds_half_up(k, n_visual, v_ref, expected):
    assert int(scale_counts(k, n_visual, v_ref)) == expected


def test_cost_table_is_the_sample_mean_with_scaled_counts():
    n_other = np.array([10, 20])
    n_visual = np.array([4, 6])
    table = cost_table(TINY, n_other, n_visual, v_ref=4)
    assert table.shape == (3, 5) and table.dtype == np.float64
    assert np.all(table == table[0])  # same row for every layer
    # k = 1: sample 0 keeps 1, sample 1 keeps round_half_up(1.5) = 2.
    assert table[1, 1] == pytest.approx((layer_flops(TINY, 11) + layer_flops(TINY, 22)) / 2, rel=1e-15)
    assert table[0, 4] == pytest.approx((layer_flops(TINY, 14) + layer_flops(TINY, 26)) / 2, rel=1e-15)
    assert np.all(np.diff(table[0]) > 0)


def test_schedule_fraction_of_keep_all_is_one():
    n_other, n_visual = np.array([40, 70, 55]), np.array([576, 576, 576])
    assert schedule_flops_fraction(LLAMA_7B, n_other, n_visual, np.full(32, 576), 576) == 1.0


def test_schedule_fraction_is_a_ratio_of_means():
    shape = LMShape(2, 8, 16, 2, 1, 4)
    n_other, n_visual = np.array([2, 10]), np.array([4, 2])
    keep = np.array([4, 2])  # sample 0: 4 then 2 visual; sample 1: 2 then 1
    pruned = (layer_flops(shape, 6) + layer_flops(shape, 4) + layer_flops(shape, 12) + layer_flops(shape, 11)) / 2
    full = (2 * layer_flops(shape, 6) + 2 * layer_flops(shape, 12)) / 2
    assert schedule_flops_fraction(shape, n_other, n_visual, keep, 4) == pytest.approx(pruned / full, rel=1e-14)


def test_schedule_fraction_falls_as_tokens_are_dropped():
    n_other, n_visual = np.array([60]), np.array([576])
    fractions = [
        schedule_flops_fraction(LLAMA_7B, n_other, n_visual, np.r_[576, np.full(31, k)], 576)
        for k in (576, 400, 200, 0)
    ]
    assert fractions[0] == 1.0 and all(a > b for a, b in zip(fractions, fractions[1:]))


def test_min_feasible_budget_is_layer_zero_only():
    n_other, n_visual = np.array([60, 90]), np.array([576, 576])
    expected = schedule_flops_fraction(LLAMA_7B, n_other, n_visual, np.r_[576, np.zeros(31, int)], 576)
    value = min_feasible_budget(LLAMA_7B, n_other, n_visual, 576)
    assert value == expected
    # 7B, ~75 text tokens, 576 visual: about 1/32 of the visual work plus the text.
    assert 0.1 < value < 0.2


@pytest.mark.parametrize("k", [0, 64, 192, 576])
def test_visual_token_equivalent_of_a_constant_schedule_is_that_constant(k):
    n_other, n_visual = np.array([40, 70, 55]), np.array([576, 576, 576])
    keep = np.r_[576, np.full(31, k)] if k != 576 else np.full(32, 576)
    # A constant k from layer 1 on, layer 0 full: compare with the strictly constant schedule.
    constant = np.full(32, k)
    assert visual_token_equivalent(LLAMA_7B, n_other, n_visual, constant, 576) == pytest.approx(k, abs=1e-6)
    vte = visual_token_equivalent(LLAMA_7B, n_other, n_visual, keep, 576)
    assert k <= vte <= 576


def test_visual_token_equivalent_matches_the_schedule_flops():
    n_other, n_visual = np.array([40, 70]), np.array([576, 576])
    keep = np.r_[np.full(2, 576), np.full(10, 300), np.full(20, 100)]
    c = visual_token_equivalent(LLAMA_7B, n_other, n_visual, keep, 576)
    spent = np.mean([np.sum(layer_flops(LLAMA_7B, o + keep)) for o in n_other])
    constant = np.mean([32 * layer_flops(LLAMA_7B, o + c) for o in n_other])
    assert constant == pytest.approx(spent, rel=1e-12)
    assert 100 < c < 300


def test_lmshape_from_llama_config():
    from transformers import LlamaConfig

    gqa = LlamaConfig(
        num_hidden_layers=4, hidden_size=64, intermediate_size=172, num_attention_heads=8, num_key_value_heads=2
    )
    assert LMShape.from_config(gqa) == LMShape(4, 64, 172, 8, 2, 8)
    plain = LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4)
    assert LMShape.from_config(plain) == LMShape(2, 32, 64, 4, 4, 8)
    # A multimodal config is unwrapped to its text_config.
    assert LMShape.from_config(SimpleNamespace(text_config=gqa)) == LMShape(4, 64, 172, 8, 2, 8)


def test_lmshape_from_config_defaults_and_errors():
    cfg = SimpleNamespace(num_hidden_layers=2, hidden_size=48, intermediate_size=96, num_attention_heads=3,
                          num_key_value_heads=None, head_dim=None)
    assert LMShape.from_config(cfg) == LMShape(2, 48, 96, 3, 3, 16)
    with pytest.raises(ValueError, match="intermediate_size"):
        LMShape.from_config(SimpleNamespace(num_hidden_layers=2, hidden_size=48, num_attention_heads=3))
    with pytest.raises(ValueError, match="num_layers"):
        LMShape(0, 8, 16, 2, 1, 4)


# ------------------------------------------------------------- visual-token-only fraction
@pytest.mark.parametrize("visual, n_visual, expected", [
    ([[3, 3, 3]], [3], 1.0),  # nothing pruned
    ([[0, 0, 0]], [3], 0.0),  # every visual token dropped before layer 0
    # one sample, 3 visual tokens, one dropped after each layer: Σ layer_flops(3, 2, 1) / 3·layer_flops(3)
    # (layer_flops(2) = 2·[2·576 + 8·2·3] = 2400)
    ([[3, 2, 1]], [3], (3648 + 2400 + 1184) / (3 * 3648)),
    # a ratio of means over samples, not a mean of ratios
    ([[1, 1, 1], [3, 3, 3]], [1, 3], 1.0),
    ([[1, 0, 0], [3, 0, 0]], [1, 3], (1184 + 3648) / (3 * (1184 + 3648))),
])
def test_visual_token_fraction_counts_only_the_visual_tokens_own_work(visual, n_visual, expected):
    from recipe_compiler.flops import visual_token_fraction

    assert visual_token_fraction(TINY, visual, n_visual) == pytest.approx(expected, rel=1e-12)


def test_visual_token_fraction_is_below_the_prompt_fraction_when_text_is_kept():
    from recipe_compiler.flops import visual_token_fraction

    keep = np.array([576, 288, 144])
    prompt = schedule_flops_fraction(TINY, [100], [576], keep, 576)
    assert visual_token_fraction(TINY, keep[None, :], [576]) < prompt < 1.0


@pytest.mark.parametrize("visual, n_visual, fragment", [
    ([[3, 3]], [3], "num_layers"),
    ([[4, 3, 3]], [3], "cannot grow"),
    ([[-1, 0, 0]], [3], "non-negative"),
])
def test_visual_token_fraction_rejects_bad_counts(visual, n_visual, fragment):
    from recipe_compiler.flops import visual_token_fraction

    with pytest.raises(ValueError, match=fragment):
        visual_token_fraction(TINY, visual, n_visual)

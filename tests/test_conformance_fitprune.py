"""FitPrune conformance: our deletion rule and cost model reproduce the reference's vectors exactly.

Vectors: tests/data/conformance/fitprune (README there), shipped with the repository. The
token_scores vectors are checked with the runtime scorer, not here. A missing vector file is an
error at collection, never a skip.
"""
from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

from recipe_compiler.methods.fitprune import (
    bisect_alpha,
    layer_prune_set,
    recipe_from_counts,
    rest_flops,
    stopping_layer,
    visual_cost,
)

VECTORS = Path(__file__).resolve().parent / "data" / "conformance" / "fitprune"
SHIPPED = ("README.md", "layer_prune_set.json", "layer_prune_set.npz", "published_recipes.json",
           "token_scores.json", "token_scores.npz", "visual_flops.json")


def _load_json(name: str) -> dict:
    return json.loads((VECTORS / name).read_text())  # FileNotFoundError (loud) if the vectors are not shipped


def _prune_cases() -> list:
    return _load_json("layer_prune_set.json")["cases"]


def _published(model: str) -> list:
    return sorted(_load_json("published_recipes.json")[model].items(), key=lambda kv: int(kv[0]))


def _rest_cases() -> list:
    return _load_json("visual_flops.json")["rest_flops"]


def test_every_conformance_vector_file_is_shipped_in_the_repository():
    missing = [name for name in SHIPPED if not (VECTORS / name).is_file()]
    assert not missing, f"missing from {VECTORS}: {missing}"
    assert len(_prune_cases()) > 0 and len(_published("llava-1.5-7b")) == 11 and len(_rest_cases()) > 0


def test_the_readme_entry_points_are_importable_under_their_names():
    """The vectors' README names the functions a checker calls; each must exist under that name."""
    readme = (VECTORS / "README.md").read_text()
    names = re.findall(r"Entry point[^`]*`([A-Za-z_][\w.]*)\(", readme)
    assert sorted(names) == ["recipe_compiler.methods.fitprune.layer_prune_set", "recipe_compiler.methods.fitprune.visual_cost",
                             "runtime.scoring.fitprune_scores"]
    for dotted in names:
        module, _, attribute = dotted.rpartition(".")
        assert callable(getattr(importlib.import_module(module), attribute)), dotted


@pytest.mark.parametrize("case", _prune_cases(), ids=lambda c: c["name"])
def test_layer_prune_set_matches_reference(case):
    arrays = np.load(VECTORS / "layer_prune_set.npz")
    cross = arrays[f"{case['name']}__cross"]
    self_scores = arrays[f"{case['name']}__self"]
    assert cross.shape == (case["v"],)

    pruned = layer_prune_set(cross, self_scores, case["W_cross"], case["W_self"], case["alpha"])

    assert pruned.dtype.kind == "i"
    assert pruned.tolist() == case["expected"]["pruned"]
    # The two prefix lengths behind the intersection, recomputed from the documented rule: the
    # pruned set must lie inside the first del_num_cross / del_num_self tokens of each order.
    order_c = np.argsort(cross.astype(np.float64), kind="stable")
    order_s = np.argsort(self_scores.astype(np.float64), kind="stable")
    exp = case["expected"]
    assert set(pruned.tolist()) == set(order_c[: exp["del_num_cross"]].tolist()) & set(
        order_s[: exp["del_num_self"]].tolist()
    )


@pytest.mark.parametrize("ratio_recipe", _published("llava-1.5-7b"), ids=lambda kv: f"llava15-{kv[0]}pct")
def test_visual_cost_reproduces_reference_scheme_flops(ratio_recipe):
    ratio, recipe = ratio_recipe
    expected = _load_json("visual_flops.json")["scheme_flops_hardcoded_llava15"][ratio]

    cost = visual_cost(recipe)

    assert isinstance(cost, int)
    assert cost == expected["flops"]
    origin = _load_json("visual_flops.json")["origin_flops"]
    assert 1 - cost / origin == pytest.approx(expected["reduction"], abs=1e-15)


def test_visual_cost_of_no_pruning_is_origin_flops():
    origin = _load_json("visual_flops.json")["origin_flops"]
    assert visual_cost([0] * 32) == origin
    assert visual_cost(np.zeros(32, dtype=np.int64), n_visual=576, hidden=4096, intermediate=11008) == origin


@pytest.mark.parametrize("entry", _rest_cases(), ids=lambda e: f"tk{e['tk']}-layer{e['layer_idx']}")
def test_rest_flops_matches_reference_forecast(entry):
    # o_proj + MLP of the current layer for tk tokens, plus every later layer in full at tk tokens.
    assert rest_flops(entry["tk"], entry["layer_idx"]) == entry["value"]


@pytest.mark.parametrize("model", ["llava-next-7b", "llava-hr-7b"])
def test_every_published_recipe_is_a_valid_cost_input(model):
    n_visual = {"llava-next-7b": 2880, "llava-hr-7b": 1024}[model]
    for _, recipe in _published(model):
        cost = visual_cost(recipe, n_visual=n_visual)
        assert 0 < cost <= visual_cost([0] * len(recipe), n_visual=n_visual)


# --- The rule's corners that the vectors do not pin (README §1), with exact binary fractions. ---

Q = [0.25, 0.25, 0.25, 0.25]


@pytest.mark.parametrize(
    "cross, self_scores, w, alpha, expected",
    [
        # target 0.5: removing two quarters leaves exactly 0.5, which still counts (>=).
        (Q, Q, 1.0, 0.5, [0, 1]),
        # target 0: every removal up to v - 1 stays above, so k = v - 1 (never all v).
        (Q, Q, 1.0, 1.0, [0, 1, 2]),
        # the current sum (1.0) is already below the target (1.5): nothing goes.
        (Q, Q, 2.0, 0.25, []),
        # alpha = 0 with a zero-mass token: removing it keeps the sum at the target.
        ([0.0, 0.5, 0.5], [0.0, 0.5, 0.5], 1.0, 0.0, [0]),
        # the intersection of the two prefixes: cross would drop {0, 1}, self {1, 2}.
        ([0.1, 0.1, 0.4, 0.4], [0.4, 0.1, 0.1, 0.4], 1.0, 0.25, [1]),
        # ties fall in position order (stable sort): the lower indices go first.
        ([0.5, 0.125, 0.125, 0.125, 0.125], [0.5, 0.125, 0.125, 0.125, 0.125], 1.0, 0.25, [1, 2]),
    ],
)
def test_layer_prune_set_rule_corners(cross, self_scores, w, alpha, expected):
    assert layer_prune_set(np.array(cross), np.array(self_scores), w, w, alpha).tolist() == expected


def test_layer_prune_set_rejects_bad_alpha_and_mismatched_inputs():
    with pytest.raises(ValueError, match="alpha"):
        layer_prune_set(np.ones(3), np.ones(3), 3.0, 3.0, 1.5)
    with pytest.raises(ValueError, match="same visual tokens"):
        layer_prune_set(np.ones(3), np.ones(4), 3.0, 3.0, 0.5)


def test_visual_cost_counts_pruning_at_the_end_of_the_layer():
    # d = m = 1, 2 tokens, prune 1 at layer 0: layer 0 runs q/k/v and attention on 2 tokens,
    # o_proj and MLP on 1: 3·2 + 2·4 + 1 + 3·1 = 18; layer 1 on 1 token: 3 + 2 + 1 + 3 = 9.
    assert visual_cost([1, 0], n_visual=2, hidden=1, intermediate=1) == 27
    with pytest.raises(ValueError, match="n_visual"):
        visual_cost([2, 1], n_visual=2)


# --- The search's pure parts (METHODS.md §2, fitprune). ---

COSTS = [  # 2 samples, check points 0..3 (3 = after the last layer); [spent, remaining]
    [[0.0, 12.0], [4.0, 6.0], [7.0, 2.0], [9.0, 0.0]],
    [[0.0, 12.0], [4.0, 7.0], [8.0, 3.0], [10.0, 0.0]],
]


@pytest.mark.parametrize(
    "budget, expected",
    [(12.0, 0), (11.0, 1), (10.5, 1), (10.4, 2), (10.0, 2), (9.5, 3), (9.4, None)],
)
def test_stopping_layer_is_first_check_point_within_budget(budget, expected):
    # means of spent + remaining: 12, 10.5, 10, 9.5
    assert stopping_layer(np.array(COSTS), budget) == expected


@pytest.mark.parametrize(
    "threshold, expected_alpha, expected_evals",
    [
        (0.3, 0.3046875, 7),  # last evaluated alpha is feasible
        (0.31, 0.3125, 7),  # last evaluated (0.3046875) is not: keep the last feasible one
        (0.0, 0.0078125, 7),
        (0.999, 1.0, 8),  # nothing inside the bracket was feasible: alpha = 1 is tried once more
        (1.5, None, 8),  # not even alpha = 1
    ],
)
def test_bisect_alpha_returns_last_feasible(threshold, expected_alpha, expected_evals):
    alpha, trace = bisect_alpha(lambda a: a >= threshold)
    assert alpha == expected_alpha
    assert len(trace) == expected_evals
    assert trace[0] == (0.5, 0.5 >= threshold)
    if alpha is not None:
        assert (alpha, True) in trace


def test_recipe_from_counts_floors_the_mean_and_stops():
    counts = np.array([[3, 2, 5, 1], [4, 1, 6, 1], [4, 2, 4, 1]])
    assert recipe_from_counts(counts, stop=None).tolist() == [3, 1, 5, 1]
    assert recipe_from_counts(counts, stop=2).tolist() == [3, 1, 0, 0]
    assert recipe_from_counts(counts.astype(float), stop=3).tolist() == [3, 1, 5, 0]
    assert recipe_from_counts(counts, stop=0).tolist() == [0, 0, 0, 0]
    assert recipe_from_counts(counts, stop=2).dtype == np.int64

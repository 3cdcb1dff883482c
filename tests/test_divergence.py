"""Divergence tables (METHODS.md §2): the objective the schedule searches minimise."""
from __future__ import annotations

import math
import time

import numpy as np
import pytest

from runtime.methods.scorers import SCORERS
from recipe_compiler.divergence import divergence_table, ranking_scores, schedule_objective
from recipe_compiler.statistics import Statistics

FLOOR = -math.log(1e-6)  # one term's cap when everything is dropped


def make_stats(cross, self_attn=None, last=None, n_visual=None, n_text=None) -> Statistics:
    cross = np.asarray(cross, dtype=np.float32)
    S, L, V = cross.shape
    self_attn = cross if self_attn is None else np.asarray(self_attn, dtype=np.float32)
    last = cross if last is None else np.asarray(last, dtype=np.float32)
    n_visual = np.full(S, V) if n_visual is None else np.asarray(n_visual)
    n_text = np.full(S, 5) if n_text is None else np.asarray(n_text)
    return Statistics(cross, self_attn, last, n_visual, n_text, n_visual + n_text + 10)


def d(lost_cross: float, lost_self: float) -> float:
    return 0.5 * (-math.log(max(1 - lost_cross, 1e-6)) - math.log(max(1 - lost_self, 1e-6)))


# One sample, 2 layers, 4 visual tokens. Layer 0's cross ranks the tokens entering layer 1:
# 1 (0.4) > 3 (0.3) > 2 (0.2) > 0 (0.1). Layer 1's distributions give the lost mass.
HAND_CROSS = [[[0.1, 0.4, 0.2, 0.3], [0.5, 0.25, 0.125, 0.125]]]
HAND_SELF = [[[0.25, 0.25, 0.25, 0.25], [0.25, 0.25, 0.25, 0.25]]]


@pytest.mark.parametrize(
    "k, expected",
    [
        (4, 0.0),
        (3, d(0.5, 0.25)),  # drop {0}
        (2, d(0.625, 0.5)),  # drop {0, 2}
        (1, d(0.75, 0.75)),  # keep {1}
        (0, FLOOR),  # everything lost: both terms hit the 1e-6 floor
    ],
)
def test_lost_mass_by_hand(k, expected):
    stats = make_stats(HAND_CROSS, HAND_SELF)
    table = divergence_table(stats, "text-mean")
    assert table.shape == (2, 5)
    assert table[1, k] == pytest.approx(expected, rel=1e-6, abs=1e-12)


def test_row_zero_forbids_pruning_before_layer_zero():
    table = divergence_table(make_stats(HAND_CROSS, HAND_SELF), "text-mean")
    assert table[0].tolist() == [math.inf] * 4 + [0.0]


def test_scorers_rank_differently():
    # Layer 0: cross favours token 0, self favours token 1; last favours token 2.
    cross = [[[0.6, 0.3, 0.1], [0.2, 0.3, 0.5]]]
    self_attn = [[[0.1, 0.8, 0.1], [0.2, 0.3, 0.5]]]
    last = [[[0.1, 0.2, 0.7], [0.2, 0.3, 0.5]]]
    stats = make_stats(cross, self_attn, last)
    # Keeping 1 token: text-mean keeps 0 → lost 0.8 (both); fitprune keeps argmax(cross·self) = 1
    # (0.24 > 0.06, 0.01) → lost 0.7; last-token keeps 2 → lost 0.5.
    expected = {"text-mean": d(0.8, 0.8), "fitprune": d(0.7, 0.7), "last-token": d(0.5, 0.5)}
    for scorer, value in expected.items():
        assert divergence_table(stats, scorer)[1, 1] == pytest.approx(value, rel=1e-6), scorer


def test_ties_keep_later_positions_as_the_runtime_does():
    # Layer 0 scores all equal: the runtime's keep_top drops the earliest first, so the survivors
    # are the last positions (the table used to keep the first ones: a mismatch with what runs).
    cross = [[[0.25, 0.25, 0.25, 0.25], [0.1, 0.2, 0.3, 0.4]]]
    table = divergence_table(make_stats(cross), "text-mean")
    assert table[1, 2] == pytest.approx(d(0.3, 0.3), rel=1e-6)  # keep {2, 3}: lose 0.1 + 0.2
    assert table[1, 1] == pytest.approx(d(0.6, 0.6), rel=1e-6)  # keep {3}


def test_samples_with_fewer_visual_tokens_scale_their_counts():
    nan = np.nan
    cross = [
        [[0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]],
        [[0.2, 0.8, nan, nan], [0.75, 0.25, nan, nan]],  # 2 visual tokens of V = 4
    ]
    stats = make_stats(cross, n_visual=[4, 2])
    table = divergence_table(stats, "text-mean")
    # k = 2 → sample 0 keeps 2 (loses 0.5), sample 1 keeps round_half_up(1) = 1: token 1 (0.8 at
    # layer 0), losing 0.75. k = 1 → sample 1 keeps round_half_up(0.5) = 1 as well.
    assert table[1, 2] == pytest.approx((d(0.5, 0.5) + d(0.75, 0.75)) / 2, rel=1e-6)
    assert table[1, 1] == pytest.approx((d(0.75, 0.75) + d(0.75, 0.75)) / 2, rel=1e-6)
    assert table[1, 4] == 0.0
    assert np.all(np.isfinite(table[1]))


def random_stats(rng, S, L, V, ragged=True) -> Statistics:
    def attention():
        a = rng.random((S, L, V)) ** 4
        return (a / a.sum(axis=-1, keepdims=True)).astype(np.float32)

    n_visual = rng.integers(max(1, V // 3), V + 1, S) if ragged else np.full(S, V)
    n_visual[0] = V
    arrays = [attention() for _ in range(3)]
    pad = np.arange(V)[None, None, :] >= n_visual[:, None, None]
    for a in arrays:
        a[np.broadcast_to(pad, a.shape)] = np.nan
    return Statistics(*arrays, n_visual, rng.integers(3, 40, S), n_visual + 50)


@pytest.mark.parametrize("scorer", SCORERS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rows_are_non_increasing_in_kept_tokens(scorer, seed):
    rng = np.random.default_rng(seed)
    table = divergence_table(random_stats(rng, S=5, L=6, V=37), scorer)
    assert table.shape == (6, 38)
    assert np.all(np.diff(table[1:], axis=1) <= 0)
    assert np.all(table[1:] >= 0) and np.all(table[:, -1] == 0)
    assert np.all(np.isfinite(table[1:]))


def test_ranking_scores_shift_by_one_layer():
    nan = np.nan
    cross = [[[0.5, 0.5, nan], [0.9, 0.1, nan], [0.3, 0.7, nan]]]
    self_attn = [[[0.2, 0.6, nan], [0.5, 0.5, nan], [0.3, 0.7, nan]]]
    stats = make_stats(cross, self_attn, n_visual=[2], n_text=[4])
    scores = ranking_scores(stats, "fitprune")
    assert scores.shape == (1, 3, 3)
    assert scores[0, 0, :2].tolist() == [math.inf, math.inf]
    np.testing.assert_allclose(scores[0, 1, :2], [0.5 * 0.2 * 4, 0.5 * 0.6 * 4], rtol=1e-6)
    np.testing.assert_allclose(scores[0, 2, :2], [0.9 * 0.5 * 4, 0.1 * 0.5 * 4], rtol=1e-6)
    assert np.isnan(scores[0, :, 2]).all()
    np.testing.assert_allclose(ranking_scores(stats, "text-mean")[0, 2, :2], [0.9, 0.1], rtol=1e-6)


def test_unknown_scorer_lists_the_choices():
    stats = make_stats(HAND_CROSS, HAND_SELF)
    with pytest.raises(ValueError, match="fitprune, text-mean, last-token"):
        divergence_table(stats, "nope")
    with pytest.raises(ValueError, match="choose one of"):
        ranking_scores(stats, "cls")


def test_schedule_objective_sums_the_chosen_entries():
    table = divergence_table(make_stats(HAND_CROSS, HAND_SELF), "text-mean")
    assert schedule_objective(table, np.array([4, 2])) == pytest.approx(d(0.625, 0.5), rel=1e-6)
    assert schedule_objective(table, np.array([3, 3])) == math.inf
    with pytest.raises(ValueError, match="one count per table row"):
        schedule_objective(table, np.array([4]))


def test_large_table_is_fast():
    rng = np.random.default_rng(0)
    S, L, V = 24, 80, 2880
    a = rng.random((S, L, V), dtype=np.float32)
    stats = Statistics(a, a, a, np.full(S, V), np.full(S, 30), np.full(S, V + 60))
    best = math.inf
    for _ in range(2):
        start = time.perf_counter()
        table = divergence_table(stats, "fitprune")
        best = min(best, time.perf_counter() - start)
    assert table.shape == (L, V + 1)
    # ~0.45 s on the 2-core CI machine when idle; the margin keeps a busy machine from failing it.
    assert best < 3.0, f"divergence_table took {best:.2f} s for S=24, L=80, V=2880"


def test_reference_grid_scales_each_samples_count():
    """With v_ref, column k means the same fraction k/v_ref for images of every size."""
    rng = np.random.default_rng(3)
    small, large = 4, 8
    cross = np.full((2, 3, large), np.nan, dtype=np.float32)
    cross[0, :, :small] = rng.random((3, small))
    cross[1] = rng.random((3, large))
    stats = Statistics(cross, cross.copy(), cross.copy(), np.array([small, large]), np.array([5, 5]), np.array([20, 24]))
    table = divergence_table(stats, "text-mean", v_ref=16)
    assert table.shape == (3, 17)
    assert table[0, 16] == 0 and np.isinf(table[0, :16]).all()
    # k = 8 of 16 is half of each image: the same as the default grid's k = 4 of 8.
    assert np.allclose(table[1:, 8], divergence_table(stats, "text-mean")[1:, 4])
    assert np.all(np.diff(table[1:], axis=1) <= 1e-12)

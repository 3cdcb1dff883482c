"""Pre-LLM scorers (METHODS.md §4): G-Prune, FoPru rank/row, CLS inflection."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from runtime.prellm import (
    cls_similarity,
    cls_inflection_keep,
    fopru_rank_keep,
    fopru_row_keep,
    fopru_significance,
    gprune_keep,
    gprune_scores,
    inflection_keep,
    knee_index,
)


def topk_positions(scores: np.ndarray, k: int) -> list[int]:
    """Indices of the k highest scores, ties by position, returned in original order."""
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
    return sorted(order[:k])


def kept(mask: torch.Tensor) -> list[int]:
    assert mask.dtype == torch.bool and mask.ndim == 1
    return torch.nonzero(mask).flatten().tolist()


# --- G-Prune ---


def reference_gprune(x: np.ndarray, threshold: float = 0.5, temperature: float = 0.03, steps: int = 5) -> np.ndarray:
    """Straightforward float64 loops: thresholded cosine graph (self-loops included), softmax over
    each row's edges, ``w ← w·A`` for ``steps`` steps, divided by the row's edge count."""
    n = len(x)
    norms = [math.sqrt(sum(float(v) ** 2 for v in row)) for row in x]
    a = np.zeros((n, n))
    degree = np.zeros(n)
    for i in range(n):
        edges = []
        for j in range(n):
            cos = float(np.dot(x[i], x[j])) / (norms[i] * norms[j])
            if i == j or cos >= threshold:
                edges.append((j, cos / temperature))
        top = max(logit for _, logit in edges)
        total = sum(math.exp(logit - top) for _, logit in edges)
        for j, logit in edges:
            a[i, j] = math.exp(logit - top) / total
        degree[i] = len(edges)
    w = np.array(norms)
    for _ in range(steps):
        w = np.array([sum(w[i] * a[i, j] for i in range(n)) for j in range(n)])
    return w / degree


def clustered_features(seed: int, n_cluster: int = 30, n_distinct: int = 8, dim: int = 32) -> np.ndarray:
    """A large cluster of near-duplicates and a few distinct tokens, interleaved."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=dim)
    cluster = base + 0.15 * rng.normal(size=(n_cluster, dim))
    distinct = rng.normal(size=(n_distinct, dim)) * rng.uniform(0.5, 2.0, (n_distinct, 1))
    x = np.concatenate([cluster, distinct])
    return x[rng.permutation(len(x))]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("params", [{}, {"threshold": 0.7, "steps": 3}, {"temperature": 0.1, "steps": 0}])
def test_gprune_scores_match_an_independent_reimplementation(seed, params):
    x = clustered_features(seed)
    expected = reference_gprune(x, **params)
    got = gprune_scores(torch.tensor(x, dtype=torch.float32), **params)
    assert got.shape == (len(x),) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("k", [4, 8, 12, 20])
def test_gprune_keep_follows_the_propagation_scores(seed, k):
    x = clustered_features(seed)
    expected_scores = reference_gprune(x)
    order = np.sort(expected_scores)[::-1]
    assert order[k - 1] - order[k] > 1e-4 * abs(order[k - 1]), "the cut must not be a near-tie"
    mask = gprune_keep(torch.tensor(x, dtype=torch.float32), k)
    assert kept(mask) == topk_positions(expected_scores, k)  # original order: a mask
    if k <= 8:  # the distinct tokens out-score the near-duplicates (degree ~30 vs 1)
        norms = np.linalg.norm(x, axis=1)
        cluster_like = (x @ x.T / np.outer(norms, norms) >= 0.5).sum(axis=1) > 10
        assert not cluster_like[kept(mask)].any()


def test_gprune_protected_tokens_are_kept_and_not_counted():
    x = clustered_features(7)
    n = len(x)
    protected = torch.zeros(n, dtype=torch.bool)
    protected[[0, 5, n - 1]] = True
    free = (~protected).numpy()
    for k in (0, 3, 10, int(free.sum())):
        mask = gprune_keep(torch.tensor(x, dtype=torch.float32), k, protected=protected)
        assert mask[protected].all()
        assert int(mask[~protected].sum()) == k
        # The graph is built on the unprotected tokens only.
        sub_scores = reference_gprune(x[free])
        expected = np.flatnonzero(free)[topk_positions(sub_scores, k)].tolist()
        assert sorted(set(kept(mask)) - {0, 5, n - 1}) == expected


def test_gprune_ties_keep_the_earlier_tokens_and_degree_counts_the_diagonal():
    x = torch.ones(6, 4)
    scores = gprune_scores(x)
    np.testing.assert_allclose(scores.numpy(), np.full(6, 2.0 / 6), rtol=1e-5)  # ‖x‖ = 2, degree 6
    assert kept(gprune_keep(x, 2)) == [0, 1]
    lonely = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    np.testing.assert_allclose(gprune_scores(lonely).numpy(), [1.0, 3.0], rtol=1e-6)  # degree 1 each


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda x: gprune_keep(x, 11), r"k=11 is out of range; it must be an integer in \[0, 10\]"),
        (lambda x: gprune_keep(x, -1), "k=-1 is out of range"),
        (lambda x: gprune_scores(x, threshold=1.5), "threshold=1.5 is out of range"),
        (lambda x: gprune_scores(x, temperature=0.0), "temperature=0.0 is out of range"),
        (lambda x: gprune_keep(x, 2, protected=torch.zeros(3, dtype=torch.bool)), "protected must be"),
        (lambda x: gprune_keep(x, 2, alpha=1.0), "unknown G-Prune parameter"),
        (lambda x: gprune_scores(x[0]), "features must be a 2-D tensor"),
    ],
)
def test_gprune_rejects_bad_inputs(call, message):
    with pytest.raises(ValueError, match=message):
        call(torch.randn(10, 4))


# --- FoPru ---


def encoder_attention(seed: int, heads: int, tokens: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(heads, tokens, tokens, generator=g) * 2.0, dim=-1)


def test_fopru_significance_with_and_without_cls():
    attn = encoder_attention(0, heads=4, tokens=1 + 12)
    a = attn.numpy().astype(np.float64)
    np.testing.assert_allclose(fopru_significance(attn).numpy(), a[:, 0, 1:].mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(fopru_significance(attn, has_cls=False).numpy(), a.mean(axis=(0, 1)), rtol=1e-6)
    with pytest.raises(ValueError, match="attn must be a"):
        fopru_significance(attn[0])


@pytest.mark.parametrize("k", [0, 1, 7, 20, 48])
def test_fopru_rank_keeps_the_top_k_by_cls_attention(k):
    attn = encoder_attention(1, heads=3, tokens=1 + 48)
    cls_attention = attn.numpy().astype(np.float64)[:, 0, 1:].mean(axis=0)
    mask = fopru_rank_keep(fopru_significance(attn), k)
    assert kept(mask) == topk_positions(cls_attention, k)


@pytest.mark.parametrize("grid_hw", [(6, 8), (5, 5), (1, 7), (7, 1)])
def test_fopru_row_keeps_whole_rows_plus_at_most_one_partial_row(grid_hw):
    h, w = grid_hw
    attn = encoder_attention(2 + h, heads=2, tokens=1 + h * w)
    sig = fopru_significance(attn)
    grid = sig.numpy().astype(np.float64).reshape(h, w)
    row_rank = sorted(range(h), key=lambda r: (-grid[r].mean(), r))
    for k in range(h * w + 1):
        mask = fopru_row_keep(sig, grid_hw, k)
        per_row = mask.reshape(h, w).sum(dim=1).tolist()
        assert sum(per_row) == k
        full = [r for r in range(h) if per_row[r] == w]
        partial = [r for r in range(h) if 0 < per_row[r] < w]
        assert len(full) == k // w and len(partial) <= 1
        assert sorted(full) == sorted(row_rank[: k // w])  # best rows first
        if partial:
            (r,) = partial
            assert r == row_rank[k // w]  # the next row in order, filled by rank
            cols = torch.nonzero(mask.reshape(h, w)[r]).flatten().tolist()
            assert cols == topk_positions(grid[r], k % w)
        assert kept(mask) == sorted(kept(mask))


def test_fopru_row_rejects_a_mismatched_grid_and_bad_k():
    sig = torch.rand(12)
    with pytest.raises(ValueError, match="cells; it must match the 12"):
        fopru_row_keep(sig, (3, 5), 4)
    with pytest.raises(ValueError, match=r"k=13 is out of range; it must be an integer in \[0, 12\]"):
        fopru_row_keep(sig, (3, 4), 13)
    with pytest.raises(ValueError, match="k=2.5 is out of range"):
        fopru_rank_keep(sig, 2.5)


# --- CLS inflection ---


@pytest.mark.parametrize("detector", ["kneedle", "max-curvature"])
@pytest.mark.parametrize("n, corner, y_corner", [(100, 10, 0.2), (576, 40, 0.1), (50, 25, 0.3), (30, 3, 0.5)])
def test_knee_of_a_piecewise_linear_curve_is_its_corner(n, corner, y_corner, detector):
    head = np.linspace(1.0, y_corner, corner + 1)
    tail = np.linspace(y_corner, 0.0, n - corner)[1:]
    values = torch.tensor(np.concatenate([head, tail]) * 3.0 + 0.5)
    # exact for both: the chord distance is linear on each segment; the only bend is the corner
    assert knee_index(values, detector) == corner + 1


@pytest.mark.parametrize("n, tau", [(576, 20.0), (576, 60.0), (200, 5.0), (2880, 150.0)])
def test_max_curvature_knee_of_an_exponential_decay_is_the_analytic_point(n, tau):
    # Normalised y(x) = A·(e^{-cx} − e^{-c}), c = (n−1)/τ, A = 1/(1 − e^{-c}). The curvature
    # y''/(1 + y'²)^{3/2} = c·u/(1 + u²)^{3/2} with u = |y'| = cA·e^{-cx} peaks at u = 1/√2, i.e.
    # i* = τ·ln(√2·(n−1) / (τ·(1 − e^{−(n−1)/τ}))) — later than Kneedle's (u = 1).
    i = np.arange(n)
    values = torch.tensor(np.exp(-i / tau))
    analytic = tau * math.log(math.sqrt(2) * (n - 1) / (tau * (1 - math.exp(-(n - 1) / tau))))
    assert abs((knee_index(values, "max-curvature") - 1) - analytic) <= 1.0
    assert knee_index(values, "max-curvature") > knee_index(values, "kneedle")


def test_max_curvature_edge_cases_and_unknown_detector():
    assert knee_index(torch.tensor([0.3]), "max-curvature") == 1
    assert knee_index(torch.tensor([0.3, 0.1]), "max-curvature") == 2
    assert knee_index(torch.full((9,), 0.4), "max-curvature") == 9
    assert knee_index(torch.linspace(1, 0, 9), "max-curvature") == 9  # straight: no bend, keep all
    concave = torch.tensor(1.0 - np.linspace(0, 1, 20) ** 2)  # bends the wrong way: no knee
    assert knee_index(concave, "max-curvature") == 20
    with pytest.raises(ValueError, match="inflection detector 'elbow' is unknown; choose one of kneedle, max-curvature"):
        knee_index(torch.tensor([3.0, 1.0]), "elbow")


@pytest.mark.parametrize("detector", ["kneedle", "max-curvature"])
def test_inflection_keep_takes_the_most_similar_head_up_to_the_detector_knee(detector):
    g = torch.Generator().manual_seed(3)
    sim = torch.rand(80, generator=g)
    mask = inflection_keep(sim, detector)
    count = knee_index(torch.sort(sim, descending=True).values, detector)
    assert kept(mask) == topk_positions(sim.numpy(), count)


@pytest.mark.parametrize("n, tau", [(576, 20.0), (576, 60.0), (200, 5.0), (2880, 150.0)])
def test_knee_of_an_exponential_decay_is_the_analytic_point(n, tau):
    # Normalised y_i = (e^{-i/τ} − e^{-(n−1)/τ}) / (1 − e^{-(n−1)/τ}), x_i = i/(n−1): the distance to
    # the chord, ∝ 1 − x − y, is maximal where dy/di = −1/(n−1), i.e.
    # i* = τ·ln((n−1) / (τ·(1 − e^{−(n−1)/τ}))).
    i = np.arange(n)
    values = torch.tensor(np.exp(-i / tau))
    analytic = tau * math.log((n - 1) / (tau * (1 - math.exp(-(n - 1) / tau))))
    assert abs((knee_index(values) - 1) - analytic) <= 1.0


def test_knee_edge_cases_and_validation():
    assert knee_index(torch.tensor([0.3])) == 1
    assert knee_index(torch.tensor([0.3, 0.1])) == 2
    assert knee_index(torch.full((9,), 0.4)) == 9  # flat: no knee, keep all
    assert knee_index(torch.linspace(1, 0, 9)) == 9  # straight: no knee, keep all
    with pytest.raises(ValueError, match="must be non-increasing; value 2 rises above value 1"):
        knee_index(torch.tensor([3.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="non-empty 1-D"):
        knee_index(torch.tensor([]))
    with pytest.raises(ValueError, match="NaN or inf"):
        knee_index(torch.tensor([1.0, float("nan")]))


def synthetic_image(seed: int, n_related: int, n_patches: int = 144, dim: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    """Patches: ``n_related`` close to the CLS direction (similarity ~0.9), the rest unrelated, shuffled."""
    g = torch.Generator().manual_seed(seed)
    cls = torch.randn(dim, generator=g)
    unit = cls / cls.norm()
    noise = torch.randn(n_patches, dim, generator=g)
    noise = noise - (noise @ unit)[:, None] * unit  # orthogonal to CLS
    noise = noise / noise.norm(dim=1, keepdim=True)
    target = torch.full((n_patches,), 0.05)
    target[:n_related] = 0.9 - 0.1 * torch.rand(n_related, generator=g)
    target[n_related:] += 0.1 * torch.rand(n_patches - n_related, generator=g)
    patches = target[:, None] * unit + torch.sqrt(1 - target**2)[:, None] * noise
    patches = patches * (1 + torch.rand(n_patches, 1, generator=g))  # norms do not matter
    perm = torch.randperm(n_patches, generator=g)
    return patches[perm], cls * 3.0


def test_cls_similarity_is_the_cosine():
    patches, cls = synthetic_image(0, 20)
    p, c = patches.double().numpy(), cls.double().numpy()
    expected = p @ c / (np.linalg.norm(p, axis=1) * np.linalg.norm(c))
    np.testing.assert_allclose(cls_similarity(patches, cls).numpy(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"cls_feature must have shape \(48,\)"):
        cls_similarity(patches, cls[:5])


def test_cls_inflection_keeps_the_related_head_and_the_count_is_per_image():
    counts = []
    for seed, n_related in ((1, 12), (2, 60)):
        patches, cls = synthetic_image(seed, n_related)
        mask = cls_inflection_keep(patches, cls)
        sim = cls_similarity(patches, cls).numpy()
        count = int(mask.sum())
        assert kept(mask) == topk_positions(sim, count)  # the most similar, in original order
        assert abs(count - n_related) <= 1  # the knee sits at the foot of the drop
        counts.append(count)
    assert counts[0] != counts[1]

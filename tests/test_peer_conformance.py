"""Conformance of the peer methods' math (``runtime.peer_math``) with their references.

Each ``ref_*`` function below is a separate, deliberately plain implementation (numpy, Python
loops, float64) of what the reference repository's code computes, written from the reference's
steps (docs/methods.md §6 cites them) and never calling ``runtime.peer_math``. The tests run both on
fixed seeded inputs of several shapes, batch > 1 and constructed ties, and require the same kept
indices exactly and the same features / scores to 1e-6. Ties follow our documented rule (the
earlier position wins), which the references leave to ``torch.topk``.

Then the invariants a user relies on: counts exactly as each method's rule says, kept order, no
duplicates, determinism and batch independence.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from runtime.peer_math import dart, divprune, fastv, pdrop, prumerge, sparsevlm, visionzip, vtc_cls

SEEDS = (0, 1, 2)


def rng_for(seed: int) -> np.random.Generator:
    return np.random.default_rng(1000 + seed)


def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def best_first(values, candidates=None):
    """Positions sorted by value descending, ties by position ascending (plain Python)."""
    idx = range(len(values)) if candidates is None else candidates
    return sorted(idx, key=lambda j: (-float(values[j]), j))


def tie(x, axis, start=0, stop=None, every=3):
    """Make exact ties: along ``axis`` (from ``start`` to ``stop``), every ``every``-th entry copies its left neighbour."""
    x = np.moveaxis(x, axis, 0)
    for i in range(start + 1, x.shape[0] if stop is None else stop, every):
        x[i] = x[i - 1]
    return np.moveaxis(x, 0, axis)


def mask_of(indices, n):
    out = np.zeros(n, dtype=bool)
    out[list(indices)] = True
    return out


# ----------------------------------------------------------------------------------------- FastV


def ref_fastv(last_row, start, n_image, keep):
    """FastV's ``modeling_llama.py``: mean over heads, last row, image slice, topk(ATTENTION_RANK)."""
    avg = last_row.mean(axis=0)  # (K,)
    image = avg[start:start + n_image]
    return sorted(start + j for j in best_first(image)[:keep])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("B,H,L,start,n", [(1, 4, 30, 3, 20), (3, 8, 50, 5, 36), (2, 2, 12, 0, 10)])
def test_fastv_matches_the_reference(seed, B, H, L, start, n):
    rng = rng_for(seed)
    rows = softmax(rng.normal(size=(B, H, L)) * 2)
    if seed == 2:  # ties: duplicated columns (equal head means)
        rows = tie(rows, 2, start, start + n)
    visual = np.zeros((B, L), dtype=bool)
    visual[:, start:start + n] = True
    for R in (0.5, 0.75):
        keep = fastv.keep_count(n, R)
        assert keep == math.floor(n * (1 - R) + 0.5)
        scores = fastv.scores(torch.tensor(rows, dtype=torch.float64))
        assert np.allclose(scores.numpy(), rows.mean(axis=1), atol=1e-6)
        got = fastv.select(torch.tensor(rows.mean(axis=1)), torch.tensor(visual), keep).numpy()
        for b in range(B):
            assert np.nonzero(got[b])[0].tolist() == ref_fastv(rows[b], start, n, keep)


def test_fastv_paper_counts():
    assert [fastv.keep_count(576, s["drop_ratio"]) for s in fastv.PAPER_SETTINGS] == [288, 144, 288, 144]
    assert fastv.DEFAULT_LAYER == 2


# ------------------------------------------------------------------------------------ PyramidDrop


def ref_pdrop_scores(q, k, n_valid):
    """``pdrop_rank_drop``: q·kᵀ/√d + causal mask, softmax in float32, mean over heads (one query)."""
    H, D = q.shape
    group = H // k.shape[0]
    out = np.zeros(k.shape[1])
    for h in range(H):
        logits = np.array([q[h] @ k[h // group, j] / math.sqrt(D) if j < n_valid else -np.inf for j in range(k.shape[1])])
        out += softmax(logits) / H
    return out


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("B,H,Hkv,L,D", [(1, 4, 4, 20, 8), (2, 8, 2, 33, 16), (3, 2, 1, 9, 4)])
def test_pdrop_scores_match_the_reference(seed, B, H, Hkv, L, D):
    rng = rng_for(seed)
    q, k = rng.normal(size=(B, H, D)), rng.normal(size=(B, Hkv, L, D))
    n_valid = rng.integers(L // 2, L + 1, size=B)
    mask = np.arange(L)[None, :] < n_valid[:, None]
    got = pdrop.last_token_scores(torch.tensor(q), torch.tensor(k), torch.tensor(mask)).numpy()
    for b in range(B):
        assert np.allclose(got[b], ref_pdrop_scores(q[b], k[b], n_valid[b]), atol=1e-6)


@pytest.mark.parametrize("n", [576, 2880, 100, 7])
@pytest.mark.parametrize("lam", [0.5, 0.4, 0.7, 1.0, 0.0])
def test_pdrop_counts_follow_int_n_lambda_power(n, lam):
    ratios = [1.0] + [lam**s for s in (1, 2, 3)]  # the reference inserts 1.0 before [λ, λ², λ³]
    assert pdrop.stage_counts(n, lam) == [int(n * r) for r in ratios]


def test_pdrop_layers_and_paper_setting():
    assert pdrop.stage_layers(32) == pdrop.REFERENCE_LAYERS == (8, 16, 24)
    assert pdrop.stage_counts(576) == [576, 288, 144, 72]
    with pytest.raises(ValueError, match=r"stages=3 is out of range; it must be an integer in \[0, 2\]"):
        pdrop.stage_layers(3, stages=3)


def test_pdrop_select_keeps_the_top_in_position_order():
    s = torch.tensor([[0.1, 0.5, 0.5, 0.2, 0.9, 0.0]])
    visual = torch.tensor([[False, True, True, True, True, True]])
    assert pdrop.select(s, visual, 2).nonzero()[:, 1].tolist() == [1, 4]  # the 0.5 tie: position 1 wins


# -------------------------------------------------------------------------------------- VisionZip


def ref_visionzip(hidden, attn_row, metric, dominant, contextual):
    """``CLIPVisionTower_VisionZip.forward`` for one image."""
    T = hidden.shape[0]
    cls = attn_row.sum(axis=0)[1:]
    top = [j + 1 for j in best_first(cls)[: dominant - 1]]
    dom = sorted([0] + top)
    rest = [j for j in range(T) if j not in dom]
    M = len(rest)
    norm = metric / np.linalg.norm(metric, axis=-1, keepdims=True)
    step = max(1, M // contextual)
    slots = list(range(0, M, step))[:contextual]
    targets = [rest[s] for s in slots]
    merge = [rest[i] for i in range(M) if i not in slots]
    sums = np.zeros((contextual, hidden.shape[1]))
    counts = np.zeros(contextual)
    for j in merge:
        sims = [norm[j] @ norm[t] for t in targets]
        best = 0
        for c in range(1, contextual):
            if sims[c] > sims[best]:
                best = c
        sums[best] += hidden[j]
        counts[best] += 1
    ctx = [hidden[t] + sums[c] / max(counts[c], 1) for c, t in enumerate(targets)]
    return dom, targets, np.concatenate([hidden[dom], np.array(ctx)])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("B,N,C,H,D,dominant,contextual", [
    (1, 16, 6, 2, 4, 5, 3), (2, 36, 8, 4, 6, 10, 4), (3, 64, 5, 3, 4, 20, 7), (1, 576, 16, 4, 8, 54, 10),
])
def test_visionzip_matches_the_reference(seed, B, N, C, H, D, dominant, contextual):
    rng = rng_for(seed)
    hidden = rng.normal(size=(B, N + 1, C))
    attn = softmax(rng.normal(size=(B, H, N + 1)) * 2)
    metric = rng.normal(size=(B, N + 1, D)).astype(np.float32).astype(np.float64)
    if seed == 2:  # ties: duplicated CLS-attention columns and duplicated keys (equal similarities)
        attn = tie(attn, 2, 1)
        metric = tie(metric, 1, 1, every=4)
    out = visionzip.visionzip(torch.tensor(hidden), torch.tensor(attn), torch.tensor(metric), dominant, contextual)
    for b in range(B):
        dom, targets, feats = ref_visionzip(hidden[b], attn[b], metric[b], dominant, contextual)
        assert out.dominant_index[b].tolist() == dom
        assert out.contextual_index[b].tolist() == targets
        assert np.allclose(out.features[b].numpy(), feats, atol=1e-6)


def test_visionzip_settings_and_edges():
    assert visionzip.SETTINGS[64] == (54, 10) and sum(visionzip.SETTINGS[192]) == 192
    assert {k: sum(v) for k, v in visionzip.SETTINGS_PER_CROP.items()} == {128: 128, 64: 64, 32: 32}
    h, a, k = torch.randn(1, 17, 4), torch.softmax(torch.randn(1, 2, 17), -1), torch.randn(1, 17, 3)
    assert visionzip.visionzip(h, a, k, 5, 0).features.shape == (1, 5, 4)  # contextual 0 is allowed
    with pytest.raises(ValueError, match="contextual=13 is out of range"):
        visionzip.visionzip(h, a, k, 5, 13)
    with pytest.raises(ValueError, match="at least 1"):
        visionzip.visionzip(h, a, k, 0, 3)


def ref_anyres_layout(per_crop_dom, contextual, rows, cols, side):
    """``restore_image_features_sorted`` + the base crop, on labelled features (crop, slot)."""
    crops, d = per_crop_dom.shape
    per = d + contextual
    label = lambda crop, slot: crop * per + slot  # noqa: E731  index into the crop-major concatenation
    out = [label(0, s) for s in range(per)]
    grid = -np.ones((rows * side, cols * side), dtype=np.int64)
    for crop in range(1, crops):
        r, c = divmod(crop - 1, cols)
        patches = sorted(int(p) - 1 for p in per_crop_dom[crop] if p != 0)
        for slot, p in enumerate(patches, start=1):
            grid[r * side + p // side, c * side + p % side] = label(crop, slot)
    out += [x for x in grid.flatten().tolist() if x >= 0]
    out += [label(crop, 0) for crop in range(1, crops)]
    out += [label(crop, d + j) for crop in range(1, crops) for j in range(contextual)]
    return out


@pytest.mark.parametrize("rows,cols", [(2, 2), (1, 2), (2, 1), (1, 3)])
def test_visionzip_llava_next_layout_matches_the_reference(rows, cols):
    rng = rng_for(rows * 10 + cols)
    side, contextual = 4, 2
    crops = 1 + rows * cols
    hidden = torch.tensor(rng.normal(size=(crops, side * side + 1, 3)))
    attn = torch.tensor(softmax(rng.normal(size=(crops, 2, side * side + 1))))
    out = visionzip.visionzip(hidden, attn, torch.tensor(rng.normal(size=(crops, side * side + 1, 3))), 6, contextual)
    got = visionzip.anyres_order(out.dominant_index, contextual, rows, cols, side).tolist()
    assert got == ref_anyres_layout(out.dominant_index.numpy(), contextual, rows, cols, side)
    assert sorted(got) == list(range(crops * (6 + contextual)))  # a permutation: nothing lost or doubled


# ------------------------------------------------------------------------------------------- DART


def ref_dart(keys, hidden, start, n_image, budget, pi, pt):
    """``get_retained_image_token`` (one unpadded prompt, positions absolute as in the reference)."""
    topk = budget // (pi + pt)
    l1 = np.abs(keys).sum(axis=-1)
    image_l1 = l1[start:start + n_image]
    query_l1 = l1[start + n_image:]
    image_indices = [start + j for j in best_first(image_l1)[:pi]]
    query_indices = [start + n_image + j for j in best_first(query_l1)[:pt]]
    indices_set = set(image_indices + query_indices)
    tmp_set = indices_set.copy()
    valid_indices = set(range(start, start + n_image))
    valid_indices.difference_update(image_indices)
    for item in list(tmp_set):
        valid_list = sorted(valid_indices)
        vec = hidden[valid_list]
        cos = vec @ hidden[item] / (np.linalg.norm(vec, axis=-1) * np.linalg.norm(hidden[item]))
        picks = [valid_list[i] for i in best_first(-cos)[: min(topk, len(valid_list))]]
        indices_set.update(picks)
        valid_indices.difference_update(picks)
    indices_set.difference_update(query_indices)
    return sorted(indices_set)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("L,start,n,budget,pi,pt", [(60, 5, 40, 16, 4, 4), (200, 35, 150, 64, 4, 4), (30, 2, 20, 6, 2, 1)])
def test_dart_matches_the_reference(seed, L, start, n, budget, pi, pt):
    rng = rng_for(seed)
    keys, hidden = rng.normal(size=(L, 12)), rng.normal(size=(L, 10))
    if seed == 2:  # ties: duplicated key norms and duplicated hidden states
        keys = tie(keys, 0, start, every=4)
        hidden = tie(hidden, 0, start, every=5)
    image = np.zeros(L, dtype=bool)
    image[start:start + n] = True
    text = np.zeros(L, dtype=bool)
    text[start + n:] = True
    got = dart.dart_keep(torch.tensor(keys), torch.tensor(hidden), torch.tensor(image), torch.tensor(text), budget, pi, pt)
    want = ref_dart(keys, hidden, start, n, budget, pi, pt)
    assert torch.nonzero(got).flatten().tolist() == want
    assert len(want) == dart.retained_count(n, budget, pi, pt, n_text=L - start - n)


def test_dart_left_padding_and_batch_give_each_prompt_its_own_result():
    rng = rng_for(5)
    L, start, n, pad = 50, 3, 30, 7
    keys, hidden = rng.normal(size=(L, 8)), rng.normal(size=(L, 6))
    image, text = np.zeros(L, bool), np.zeros(L, bool)
    image[start:start + n], text[start + n:] = True, True
    alone = dart.dart_keep(torch.tensor(keys), torch.tensor(hidden), torch.tensor(image), torch.tensor(text), 12)
    padded = lambda x: np.concatenate([np.zeros((pad,) + x.shape[1:], x.dtype), x])  # noqa: E731
    valid = np.concatenate([np.zeros(pad, bool), np.ones(L, bool)])
    batch = dart.dart_keep(torch.tensor(np.stack([padded(keys), padded(keys)])), torch.tensor(np.stack([padded(hidden)] * 2)),
                           torch.tensor(np.stack([padded(image)] * 2)), torch.tensor(np.stack([padded(text)] * 2)), 12,
                           valid=torch.tensor(np.stack([valid] * 2)))
    assert batch[0, pad:].tolist() == batch[1, pad:].tolist() == alone.tolist()


def test_dart_default_budget():
    assert dart.token_topk(128) == 16 and dart.retained_count(576, 128) == 132
    assert dart.token_topk(320) == 40  # LLaVA-NeXT scripts


# --------------------------------------------------------------------------------------- DivPrune


def ref_divprune(x, ratio):
    """``DivPrune`` (the published function, as the ports reproduce it), picks never repeated."""
    n = x.shape[0]
    terms = int(round(ratio * n))
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    dist = 1.0 - unit @ unit.T
    picked = []
    for i in range(terms):
        if i == 0:
            scores = np.sort(dist, axis=0)[1]
        else:
            scores = dist[picked].min(axis=0)
        best = None
        for j in range(n):
            if j not in picked and (best is None or scores[j] > scores[best]):
                best = j
        picked.append(best)
    return picked


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("B,N,D,ratio", [(1, 20, 6, 0.3), (2, 64, 8, 0.098), (3, 40, 4, 0.5), (1, 576, 16, 0.098)])
def test_divprune_matches_the_reference(seed, B, N, D, ratio):
    rng = rng_for(seed)
    x = rng.normal(size=(B, N, D))
    if seed == 2:  # ties: exact duplicates
        x = tie(x, 1)
    k = divprune.keep_count(N, ratio)
    order, keep = divprune.divprune(torch.tensor(x), k)
    for b in range(B):
        want = ref_divprune(x[b], ratio)
        assert order[b].tolist() == want
        assert keep[b].numpy().tolist() == mask_of(want, N).tolist()


def test_divprune_default_count():
    assert divprune.keep_count(576) == round(0.098 * 576) == 56


# -------------------------------------------------------------------------------------- SparseVLM


def ref_raters(v, t):
    """``Select Text Raters``: softmax over text of V·Tᵀ, mean over image tokens, > mean."""
    m = softmax(v @ t.T, axis=1).mean(axis=0)
    return m > m.mean()


def ref_rope_weights(positions_q, positions_k, inv_freq):
    """v2's ``rope_weights``: RoPE applied to all-ones queries and keys, then q·kᵀ/√d."""
    d = 2 * len(inv_freq)

    def rotate(p):
        angles = np.concatenate([p * inv_freq, p * inv_freq])
        ones = np.ones(d)
        half = np.concatenate([-ones[d // 2:], ones[: d // 2]])  # rotate_half(ones)
        return ones * np.cos(angles) + half * np.sin(angles)

    return np.array([[rotate(pq) @ rotate(pk) / math.sqrt(d) for pk in positions_k] for pq in positions_q])


def ref_sparsevlm_scores(attn, rater, bias, top_heads):
    """v2: attn / rope weights, top heads by rater→image sum, mean heads, mean rater rows."""
    a = attn / bias[None] if bias is not None else attn
    rows = np.nonzero(rater)[0]
    if top_heads is not None and top_heads < a.shape[0]:
        sums = [a[h][rows].sum() for h in range(a.shape[0])]
        heads = best_first(sums)[:top_heads]
        a = a[heads]
    return a.mean(axis=0)[rows].mean(axis=0)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("B,H,V,T,D,top", [(1, 16, 20, 6, 8, 14), (2, 4, 30, 9, 8, 14), (3, 20, 12, 5, 4, 14), (2, 6, 10, 4, 4, None)])
def test_sparsevlm_matches_the_reference(seed, B, H, V, T, D, top):
    rng = rng_for(seed)
    visual, text = rng.normal(size=(B, V, D)), rng.normal(size=(B, T, D))
    r = sparsevlm.raters(torch.tensor(visual), torch.tensor(text)).numpy()
    attn = softmax(rng.normal(size=(B, H, T, V + 40)))[..., 10:10 + V]  # rows over a longer sequence
    if seed == 2:  # ties in the scores: duplicated image columns
        attn = tie(attn, 3)
    inv_freq = 1.0 / (10000 ** (np.arange(0, D, 2) / D))
    qpos = np.arange(10 + V + 3, 10 + V + 3 + T)[None].repeat(B, 0)
    kpos = np.arange(10, 10 + V)[None].repeat(B, 0)
    bias = sparsevlm.rope_bias(torch.tensor(qpos), torch.tensor(kpos), torch.tensor(inv_freq))
    got = sparsevlm.scores(torch.tensor(attn), torch.tensor(r), bias, top_heads=top).numpy()
    for b in range(B):
        assert r[b].tolist() == ref_raters(visual[b], text[b]).tolist()
        rope = ref_rope_weights(qpos[b], kpos[b], inv_freq)
        assert np.allclose(bias[b].numpy(), rope, atol=1e-6)
        want = ref_sparsevlm_scores(attn[b], r[b], rope, top)
        assert np.allclose(got[b], want, rtol=1e-5, atol=1e-6)
        n_keep = sparsevlm.keep_count(sparsevlm.SCHEDULES["2.0"][64][2], V)
        kept = sparsevlm.select(torch.tensor(want)[None], n_keep)[0]
        assert torch.nonzero(kept).flatten().tolist() == sorted(best_first(want)[:n_keep])


def test_sparsevlm_schedules_and_counts():
    assert sparsevlm.SCHEDULES["2.0"][192] == (300, 200, 118) and sparsevlm.SCHEDULES["1.0"][64] == (66, 30, 17)
    assert sparsevlm.LAYERS == (2, 6, 15)
    assert sparsevlm.keep_count(300, 576) == 300 and sparsevlm.keep_count(300, 250) == 249  # min(count, n − 1)
    equal = torch.ones(1, 4, 3)
    assert sparsevlm.raters(equal, equal).all()  # nobody above the mean: every text token rates


# ---------------------------------------------------------------------------------------- VTC-CLS


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("layers,B,H,N,k", [(7, 1, 4, 16, 5), (3, 2, 2, 36, 9), (1, 3, 6, 576, 36)])
def test_vtc_cls_matches_the_reference(seed, layers, B, H, N, k):
    rng = rng_for(seed)
    rows = softmax(rng.normal(size=(layers, B, H, N + 1)) * 2)
    if seed == 2:  # ties: duplicated patch columns
        rows = tie(rows, 3, 1)
    got_scores = vtc_cls.scores(torch.tensor(rows)).numpy()
    got = vtc_cls.select(torch.tensor(got_scores), k).numpy()
    for b in range(B):
        total = np.zeros(N)
        for layer in range(layers):  # cls_token_only: Σ over layers of attn.mean(heads)[0, 1:]
            total += rows[layer, b].mean(axis=0)[1:]
        assert np.allclose(got_scores[b], total, atol=1e-6)
        assert np.nonzero(got[b])[0].tolist() == sorted(best_first(total)[:k])


def test_vtc_cls_layers():
    assert list(vtc_cls.layer_range(24)) == list(range(24))[16:-1]
    with pytest.raises(ValueError, match="leaves no layer"):
        vtc_cls.layer_range(24, 23)


# --------------------------------------------------------------------------------------- PruMerge


def ref_prumerge(features, q, k, plus):
    """``token_prune_merge_advanced(_plus)`` for one image (B = 1)."""
    N, C = features.shape
    attn = softmax(q @ k.T * C ** -0.5, axis=-1)
    cls = attn[0, 1:]
    q1, q3 = np.percentile(cls, 25), np.percentile(cls, 75)
    ratio = len(np.where(cls > q3 + 1.5 * (q3 - q1))[0]) / len(cls)
    idx = best_first(cls)[: int(N * ratio)]
    if plus:
        step = int(1 / ratio)
        idx = idx + [x for x in range(int(step / 6), N - 1, int(step / 3)) if x not in idx]
    keys = k[1:]
    compl = sorted(set(range(N)) - set(idx))
    unit = keys / np.linalg.norm(keys, axis=-1, keepdims=True)
    merged = []
    for i, token in enumerate(idx):
        rest = idx[:i] + idx[i + 1:] + compl
        sims = [unit[token] @ unit[j] for j in rest]
        near = [rest[m] for m in best_first(sims)[:32]]
        merged.append(features[token] + sum(features[j] * cls[j] for j in near))
    extra = sum(features[j] * cls[j] for j in compl)
    return idx, np.array(merged + [extra])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("plus", [True, False])
@pytest.mark.parametrize("N,C", [(64, 8), (144, 12), (576, 16)])
def test_prumerge_matches_the_reference(seed, plus, N, C):
    rng = rng_for(seed)
    features = rng.normal(size=(N, C))
    q, k = rng.normal(size=(N + 1, C)) * 1.5, rng.normal(size=(N + 1, C)) * 1.5
    if seed == 2:  # ties: duplicated keys (equal similarities)
        k = tie(k, 0, 1, every=7)
    a = prumerge.cls_attention(torch.tensor(q), torch.tensor(k))
    assert np.allclose(a.numpy(), softmax(q @ k.T * C ** -0.5, axis=-1)[0, 1:], atol=1e-9)
    idx, feats = ref_prumerge(features, q, k, plus)
    out = prumerge.prumerge(torch.tensor(features), torch.tensor(k), a, plus=plus)
    assert out.index.tolist() == idx
    assert np.allclose(out.features.numpy(), feats, atol=1e-6)


def test_prumerge_count_rule_and_refusals():
    rng = rng_for(4)
    for _ in range(20):
        a = torch.tensor(softmax(rng.normal(size=576) * rng.uniform(0.5, 4)))
        x = a.numpy()
        q1, q3 = np.percentile(x, 25), np.percentile(x, 75)
        assert prumerge.outlier_count(a) == int(576 * (np.sum(x > q3 + 1.5 * (q3 - q1)) / 576))
    four = torch.tensor([0.01] * 60 + [0.2, 0.3, 0.1, 0.19])
    assert prumerge.outlier_count(four) == 4
    # step = int(1 / (4/64)) = 16: samples from int(16/6) = 2 every int(16/3) = 5, below N − 1
    assert prumerge.spatial_samples(4 / 64, 64).tolist() == list(range(2, 63, 5))
    with pytest.raises(ValueError, match="at least one IQR outlier"):
        prumerge.prumerge(torch.randn(16, 4), torch.randn(16, 4), torch.full((16,), 1 / 16))


# ------------------------------------------------------------------------------------- invariants


def all_selectors(seed):
    """(name, callable returning a (B, N) keep mask, expected per-row count) on one seeded batch."""
    rng = rng_for(seed)
    B, N = 3, 48
    scores = torch.tensor(rng.random((B, N)))
    feats = torch.tensor(rng.normal(size=(B, N, 6)))
    visual = torch.ones(B, N, dtype=torch.bool)
    return [
        ("fastv", lambda: fastv.select(scores, visual, fastv.keep_count(N, 0.75)), fastv.keep_count(N, 0.75)),
        ("pdrop", lambda: pdrop.select(scores, visual, pdrop.stage_counts(N)[2]), pdrop.stage_counts(N)[2]),
        ("divprune", lambda: divprune.divprune(feats, divprune.keep_count(N, 0.25))[1], divprune.keep_count(N, 0.25)),
        ("sparsevlm", lambda: sparsevlm.select(scores, sparsevlm.keep_count(30, N)), 30),
        ("vtc-cls", lambda: vtc_cls.select(scores, 12), 12),
    ]


@pytest.mark.parametrize("seed", SEEDS)
def test_counts_are_exact_and_calls_are_deterministic(seed):
    for name, run, count in all_selectors(seed):
        first, second = run(), run()
        assert first.dtype == torch.bool and (first == second).all(), name
        assert first.sum(dim=1).tolist() == [count] * first.shape[0], name


def test_each_batch_row_is_what_it_would_be_alone():
    rng = rng_for(9)
    feats = torch.tensor(rng.normal(size=(4, 30, 5)))
    order, keep = divprune.divprune(feats, 7)
    for b in range(4):
        alone_order, alone_keep = divprune.divprune(feats[b], 7)
        assert order[b].tolist() == alone_order.tolist() and keep[b].tolist() == alone_keep.tolist()
    h, a, k = torch.randn(3, 37, 4, dtype=torch.float64), torch.softmax(torch.randn(3, 2, 37), -1), torch.randn(3, 37, 3)
    together = visionzip.visionzip(h, a, k, 9, 4)
    for b in range(3):
        alone = visionzip.visionzip(h[b:b + 1], a[b:b + 1], k[b:b + 1], 9, 4)
        assert torch.equal(together.features[b], alone.features[0])
        assert together.dominant_index[b].tolist() == alone.dominant_index[0].tolist()


def test_indices_are_unique_and_in_the_documented_order():
    rng = rng_for(3)
    h = torch.tensor(rng.normal(size=(2, 65, 4)))
    out = visionzip.visionzip(h, torch.softmax(torch.randn(2, 3, 65), -1), torch.randn(2, 65, 5), 12, 6)
    for b in range(2):
        d, c = out.dominant_index[b].tolist(), out.contextual_index[b].tolist()
        assert d == sorted(d) and c == sorted(c) and len(set(d + c)) == len(d) + len(c) and d[0] == 0
        assert sorted(d + c + out.merged_index[b].tolist()) == list(range(65))  # every token used once
    a = torch.softmax(torch.tensor(rng.normal(size=64)) * 3, 0)
    res = prumerge.prumerge(torch.tensor(rng.normal(size=(64, 4))), torch.tensor(rng.normal(size=(64, 4))), a)
    n_out = prumerge.outlier_count(a)
    assert res.index.unique().numel() == res.index.numel()
    assert (a[res.index[:n_out]].diff() <= 0).all()  # outliers by descending attention, then samples ascending
    assert (res.index[n_out:].diff() > 0).all()

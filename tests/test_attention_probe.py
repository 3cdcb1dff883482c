"""The scoring probe's row sums equal a brute-force softmax of the full attention matrix.

The runtime computes only the weighted rows, in chunks, without repeating GQA key heads and with a
finite mask floor; this checks each of those shortcuts against the textbook computation.
"""
from __future__ import annotations

import pytest
import torch

from runtime.attention import attention_row_sums


def brute_force(query, key, allowed, scaling, weights, head_reduce):
    heads = query.shape[1]
    key = key.repeat_interleave(heads // key.shape[1], dim=1)
    scores = (query.double() @ key.double().transpose(-1, -2)) * scaling
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.nan_to_num(scores.softmax(dim=-1), nan=0.0)
    reduced = probs.amax(dim=1) if head_reduce == "max" else probs.mean(dim=1)
    return torch.einsum("bgq,bqk->bgk", weights.double(), reduced)


CASES = [
    # name, batch, heads, kv_heads, length, left padding of sample 1, mask kind, chunk
    ("plain causal, no mask", 1, 4, 4, 23, 0, "none", 128),
    ("boolean mask, padded", 2, 4, 4, 23, 5, "bool", 128),
    ("additive mask, padded", 2, 4, 4, 23, 5, "float", 128),
    ("GQA 8/2, boolean", 2, 8, 2, 31, 3, "bool", 128),
    ("GQA, one-row chunks", 2, 8, 2, 17, 4, "bool", 1),
    ("uneven chunks", 1, 6, 3, 29, 0, "none", 5),
    ("GQA 6/2, additive mask, uneven chunks", 2, 6, 2, 27, 4, "float", 5),
    ("GQA 6/3, per-head boolean mask", 2, 6, 3, 21, 3, "bool-heads", 4),
    ("per-head additive mask", 2, 4, 4, 19, 2, "float-heads", 6),
]


def padded_case(batch: int, length: int, pad: int, mask_kind: str, heads: int = 1):
    """(valid, allowed, mask, weights) of a causal batch whose sample 1 has ``pad`` left-padding tokens.

    ``mask`` is what transformers passes in the ``mask_kind`` form ("none", "bool", "float"; with
    "-heads", one copy per query head: (B, heads, L, L));
    ``weights`` are two row groups with scattered rows (a gap, padding rows excluded) and fractional weights.
    """
    valid = torch.ones(batch, length, dtype=torch.bool)
    if batch > 1:
        valid[1, :pad] = False
    allowed = torch.tril(torch.ones(length, length, dtype=torch.bool))[None, None] & valid[:, None, None, :]
    mask = {
        "none": None,
        "bool": allowed,
        "float": torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min),
    }[mask_kind.removesuffix("-heads")]
    if mask_kind.endswith("-heads"):
        mask = mask.expand(-1, heads, -1, -1).contiguous()
    weights = torch.zeros(batch, 2, length)
    weights[:, 0, length - 6 :] = 1.0
    weights[:, 1, 7 : length - 9 : 2] = 0.5
    weights *= valid[:, None, :]
    return valid, allowed, mask, weights


@pytest.mark.parametrize("head_reduce", ["max", "mean"])
@pytest.mark.parametrize("name,batch,heads,kv_heads,length,pad,mask_kind,chunk", CASES, ids=[c[0] for c in CASES])
def test_row_sums_equal_brute_force(name, batch, heads, kv_heads, length, pad, mask_kind, chunk, head_reduce):
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(batch, heads, length, 8, generator=generator)
    key = torch.randn(batch, kv_heads, length, 8, generator=generator)
    _, allowed, mask, weights = padded_case(batch, length, pad, mask_kind, heads)
    expected = brute_force(query, key, allowed, 0.3, weights, head_reduce)
    got = attention_row_sums(query, key, mask, 0.3, weights, head_reduce, chunk=chunk)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mask_kind", ["none", "bool"])
def test_row_sums_of_the_last_rows_against_a_longer_key(mask_kind):
    # Queries that are the last rows of the keys (a prefill after a cached prefix): causal from that offset.
    generator = torch.Generator().manual_seed(2)
    query, key = torch.randn(1, 6, 9, 8, generator=generator), torch.randn(1, 2, 20, 8, generator=generator)
    allowed = torch.tril(torch.ones(20, 20, dtype=torch.bool))[None, None, -9:]
    weights = torch.zeros(1, 2, 9)
    weights[0, 0, 4:] = 1.0
    weights[0, 1, :3] = 0.25
    expected = brute_force(query, key, allowed, 0.3, weights, "max")
    got = attention_row_sums(query, key, allowed if mask_kind == "bool" else None, 0.3, weights, "max", chunk=2)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_no_weighted_rows_gives_zeros():
    query, key = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4)
    assert torch.equal(attention_row_sums(query, key, None, 0.5, torch.zeros(1, 1, 6)), torch.zeros(1, 1, 6))

"""FitPrune run-time scorer vs the reference (tests/data/conformance/fitprune/token_scores.*, shipped)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from runtime.scoring import fitprune_scores

VECTORS = Path(__file__).resolve().parent / "data" / "conformance" / "fitprune"
VISUAL_START = 35  # the reference's system-prompt length


def _cases():
    cases = json.loads((VECTORS / "token_scores.json").read_text())["cases"]  # missing file: a loud collection error
    assert cases, f"no cases in {VECTORS / 'token_scores.json'}"
    return cases


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c["name"])
def test_dropped_tokens_match_the_reference(case):
    weights = torch.from_numpy(np.load(VECTORS / "token_scores.npz")[f"{case['name']}__attn_weights"])
    scores = fitprune_scores(weights, VISUAL_START, case["left_vtoken_num"])
    assert scores.shape == (case["left_vtoken_num"],)
    dropped = torch.sort(scores, stable=True).indices[: case["delete"]]
    assert set(dropped.tolist()) == set(case["expected_pruned_visual_idx_in_sort_order"])
    positions = sorted(VISUAL_START + i for i in dropped.tolist())
    assert positions == case["expected_pruned_sequence_positions"]


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c["name"])
def test_runtime_keep_top_drops_the_same_tokens(case):
    """The production selection (keep_top on row sums) agrees with the reference on full attention."""
    from runtime.methods.scorers import SCORERS
    from runtime.scoring import keep_top

    weights = torch.from_numpy(np.load(VECTORS / "token_scores.npz")[f"{case['name']}__attn_weights"]).float()
    n, v = weights.shape[-1], case["left_vtoken_num"]
    position = torch.arange(n)
    visual = ((position >= VISUAL_START) & (position < VISUAL_START + v))[None]
    text = (position >= VISUAL_START + v)[None]
    head_max = weights.amax(dim=1)  # (1, n, n)
    sums = torch.stack([(head_max * text[..., None]).sum(1), (head_max * visual[..., None]).sum(1)], dim=1)
    kept = keep_top(SCORERS["fitprune"].scores(sums, text, visual), visual, torch.tensor([v - case["delete"]]))
    dropped = sorted((position[visual[0] & ~kept[0]] - VISUAL_START).tolist())
    assert dropped == sorted(case["expected_pruned_visual_idx_in_sort_order"])

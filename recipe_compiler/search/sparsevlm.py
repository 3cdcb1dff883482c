"""SparseVLM's schedule (``--search sparsevlm``, v2): cuts after layers 2, 6 and 15, the v2 schedule's shape.

SparseVLM v2 (Gumpest/SparseVLMs; docs/methods.md) scores at layers 2, 6 and 15 of LLaVA-1.5's 32
(scaled here to ``l·L // 32``) and drops from those layers' outputs, i.e. on entry to the next;
its counts come from a per-budget table (``score.py``: 192 → 300/200/118 of 576, …). This search
scales the 192-token schedule by the largest factor whose exact FLOPs meet the budget (each
count at most the previous − 1, the reference's ``min(schedule, n − 1)``). Paper settings:
``--search-param tokens=192|128|96|64`` uses that row of the v2 table (scaled to the image's
token count) and refuses a budget it exceeds.

Example:
    >>> scoring_layers(32), scoring_layers(8)
    ((2, 6, 15), (0, 1, 3))
"""
from __future__ import annotations

import numpy as np

from runtime.peer_math import sparsevlm as reference

from ..errors import BudgetError
from .base import Param, register_search

REFERENCE_DEPTH = 32
REFERENCE_TOKENS = 576
DEFAULT_TOKENS = 192


def scoring_layers(num_layers: int) -> tuple[int, ...]:
    """The scoring layers scaled to depth, strictly increasing, each leaving a layer after it."""
    out: list[int] = []
    for layer in reference.LAYERS:
        scaled = max(layer * num_layers // REFERENCE_DEPTH, out[-1] + 1 if out else 0)
        if scaled < num_layers - 1:
            out.append(scaled)
    return tuple(out)


def staged(num_layers: int, v_ref: int, counts) -> np.ndarray:
    """int64 [L]: ``counts[s]`` from the layer after scoring layer ``s`` on, each at most the previous − 1."""
    keep = np.full(num_layers, v_ref, dtype=np.int64)
    previous = v_ref
    for layer, count in zip(scoring_layers(num_layers), counts):
        previous = max(0, min(int(count), previous - 1))
        keep[layer + 1:] = previous
    return keep


def table_counts(tokens: int, v_ref: int) -> list[int]:
    """The v2 table's row for ``tokens``, scaled from 576 to ``v_ref`` tokens (round half up)."""
    return [int(np.floor(c * v_ref / REFERENCE_TOKENS + 0.5)) for c in reference.SCHEDULES["2.0"][tokens]]


def paper_schedule(num_layers: int, v_ref: int) -> np.ndarray:
    """The 192-token v2 schedule (300/200/118 of 576) at the scaled layers."""
    return staged(num_layers, v_ref, table_counts(DEFAULT_TOKENS, v_ref))


def _tokens_ok(value) -> bool:
    return value in reference.SCHEDULES["2.0"] and not isinstance(value, bool)


@register_search(
    "sparsevlm", provenance="sparsevlm-v2", title="SparseVLM", scorer="sparsevlm", example=paper_schedule,
    params={
        "tokens": Param(None, _tokens_ok, f"one of {', '.join(map(str, sorted(reference.SCHEDULES['2.0'])))}",
                        "a row of the v2 schedule table (default: the 192 row scaled to the budget)"),
    },
)
def sparsevlm_schedule(table, cost, budget_flops, extra=lambda keep: 0.0, tokens=None):
    """SparseVLM v2's schedule under ``budget_flops``; returns ``(keep, found)``.

    Raises:
        BudgetError: the budget cannot be met even keeping nothing after the first scoring layer,
            or by the fixed ``tokens`` row.
    """
    num_layers, v_ref = cost.shape[0], cost.shape[1] - 1
    layers = scoring_layers(num_layers)
    if not layers:
        raise ValueError(f"SparseVLM needs a language model of at least 2 layers, this one has {num_layers}")
    rows = np.arange(num_layers)
    full = float(cost[rows, v_ref].sum())
    limit = budget_flops * (1 + 1e-9)
    shape = np.asarray(reference.SCHEDULES["2.0"][DEFAULT_TOKENS], dtype=np.float64) * v_ref / REFERENCE_TOKENS

    def flops(keep: np.ndarray) -> float:
        return float(cost[rows, keep].sum()) + extra(keep)

    if tokens is not None:
        keep = staged(num_layers, v_ref, table_counts(tokens, v_ref))
        if flops(keep) > limit:
            raise BudgetError(f"SparseVLM's {tokens}-token schedule spends {flops(keep) / full:.4f} of the prefill FLOPs, over the "
                              f"budget {budget_flops / full:.4g}; raise --budget or drop --search-param tokens")
        found = {"tokens": int(tokens)}
    else:
        at = lambda scale: staged(num_layers, v_ref, np.floor(scale * shape))  # noqa: E731
        if flops(at(0.0)) > limit:
            spent = flops(at(0.0)) / full
            raise BudgetError(f"SparseVLM cannot meet budget {budget_flops / full:.4g}: keeping no image token after layer {layers[0]} "
                              f"spends {spent:.4f} of the prefill FLOPs; use --budget {np.ceil(spent * 1000) / 1000:g} or more")
        low, high = 0.0, float(v_ref)  # counts are non-decreasing in the scale; at v_ref every count is capped
        for _ in range(60):
            mid = (low + high) / 2
            if flops(at(mid)) <= limit:
                low = mid
            else:
                high = mid
        keep = at(low)
        found = {"scale_of_192_schedule": round(low, 9)}
    found.update(layers=[int(l) for l in layers], counts=[int(keep[l + 1]) for l in layers])
    return keep, found

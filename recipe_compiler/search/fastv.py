"""FastV's schedule (``--search fastv``): one cut on entry to layer ``K``, the count that meets the budget.

FastV (pkunlp-icler/FastV; docs/methods.md) drops image tokens once, on entry to decoder layer
``K`` (2 by default; the paper also runs 3), ranked by layer ``K − 1``'s attention from the last
prompt token, averaged over heads (the ``last-token`` scorer, head-mean by definition). This
search keeps the largest count at ``K`` whose exact FLOPs meet the budget; the paper's fixed
settings are ``--search-param drop_ratio=0.5`` (or 0.75), which keeps
:func:`runtime.peer_math.fastv.keep_count` tokens and refuses a budget they exceed.

Example:
    >>> import numpy as np
    >>> cost = np.tile(np.arange(5.0), (4, 1)) + 10          # 4 layers, 4 reference tokens
    >>> keep, found = fastv_schedule(np.zeros((4, 5)), cost, budget_flops=50.0)
    >>> keep.tolist(), found["keep"]
    ([4, 4, 1, 1], 1)
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from runtime.peer_math import fastv as reference

from ..errors import BudgetError
from .base import Param, is_int_in, is_number_in, register_search


def one_cut(num_layers: int, v_ref: int, layer: int, count: int) -> np.ndarray:
    """int64 [L]: every token before ``layer``, ``count`` from it on."""
    keep = np.full(num_layers, v_ref, dtype=np.int64)
    keep[layer:] = count
    return keep


def largest_count(flops: Callable[[int], float], budget_flops: float, v_ref: int) -> int | None:
    """The largest ``k`` in ``[0, v_ref]`` with ``flops(k) <= budget_flops`` (``flops`` non-decreasing), or None."""
    if flops(0) > budget_flops:
        return None
    low, high = 0, v_ref  # flops(low) fits; find the last k that fits
    while low < high:
        mid = (low + high + 1) // 2
        if flops(mid) <= budget_flops:
            low = mid
        else:
            high = mid - 1
    return low


def check_layer(layer: int, num_layers: int, title: str) -> None:
    if not 1 <= layer < num_layers:
        raise ValueError(f"{title} layer {layer} is out of range for a {num_layers}-layer language model; "
                         f"use --search-param layer=K with 1 <= K < {num_layers}")


def paper_schedule(num_layers: int, v_ref: int) -> np.ndarray:
    """FastV's repository default: K = 2, R = 0.5 (layer 1 for a model of two layers)."""
    return one_cut(num_layers, v_ref, min(reference.DEFAULT_LAYER, num_layers - 1), reference.keep_count(v_ref, reference.DEFAULT_DROP_RATIO))


@register_search(
    "fastv", provenance="fastv", title="FastV", scorer="last-token", example=paper_schedule,
    params={
        "layer": Param(None, is_int_in(1), "an integer K >= 1 below the model's depth (paper: 2 or 3)",
                       "the layer on whose entry FastV cuts (default 2, earlier only where the budget needs it)"),
        "drop_ratio": Param(None, is_number_in(0.0, 1.0), "a number in [0, 1] (paper: 0.5 or 0.75)",
                            "a fixed share of image tokens to drop (default: the most tokens the budget allows)"),
    },
)
def fastv_schedule(table, cost, budget_flops, extra=lambda keep: 0.0, layer=None, drop_ratio=None):
    """FastV's one-cut schedule under ``budget_flops``; returns ``(keep, found)``.

    ``layer=None`` cuts at K = 2 unless even dropping every image token there exceeds the budget;
    then at the latest earlier layer that meets it (``found["layer_moved"]``). A given layer is
    never moved.

    Raises:
        BudgetError: the budget cannot be met at the given layer (or at layer 1), or the fixed
            ``drop_ratio`` exceeds it; the message gives the smallest budget.
    """
    v_ref = cost.shape[1] - 1
    fixed = None if drop_ratio is None else (reference.keep_count(v_ref, drop_ratio), f"drop ratio {drop_ratio:g}", "drop_ratio")
    keep, found = one_cut_search("FastV", cost, budget_flops, extra, layer, reference.DEFAULT_LAYER, fixed)
    found["drop_ratio"] = round(1.0 - found["keep"] / v_ref, 9)
    return keep, found


def one_cut_search(title, cost, budget_flops, extra, layer, default_layer, fixed=None):
    """The one-cut search FastV and DART share: the most tokens at ``layer`` within the budget.

    Args:
        fixed: ``(count, description, parameter)`` of a paper setting that fixes the count.

    Returns:
        ``(keep, {"layer", "keep"[, "layer_moved"]})``.
    """
    num_layers, v_ref = cost.shape[0], cost.shape[1] - 1
    default = min(default_layer, num_layers - 1)
    if layer is not None:
        check_layer(layer, num_layers, title)
    rows = np.arange(num_layers)
    full = float(cost[rows, v_ref].sum())
    limit = budget_flops * (1 + 1e-9)

    def flops(at: int, count: int) -> float:
        keep = one_cut(num_layers, v_ref, at, count)
        return float(cost[rows, keep].sum()) + extra(keep)

    tried = [layer] if layer is not None else list(range(default, 0, -1))
    for at in tried:
        count = fixed[0] if fixed is not None else largest_count(lambda k: flops(at, k), limit, v_ref)
        if count is not None and flops(at, count) <= limit:
            break
    else:
        at = tried[-1]
        if fixed is not None:
            raise BudgetError(f"{title} at K={at}, {fixed[1]} spends {flops(at, fixed[0]) / full:.4f} of the prefill "
                              f"FLOPs, over the budget {budget_flops / full:.4g}; raise --budget or drop --search-param {fixed[2]}")
        floor = flops(at, 0) / full
        raise BudgetError(f"{title} at K={at} cannot meet budget {budget_flops / full:.4g}: dropping every image token at "
                          f"layer {at} still spends {floor:.4f} of the prefill FLOPs; use --budget {np.ceil(floor * 1000) / 1000:g} "
                          "or more" + (", or a smaller --search-param layer" if at > 1 else ""))
    keep = one_cut(num_layers, v_ref, at, count)
    found = {"layer": int(at), "keep": int(count)}
    if layer is None and at != default:
        found["layer_moved"] = f"K={default} cannot meet the budget; the latest layer that can"
    return keep, found

"""FitPrune (arXiv 2409.10197): the reference's arithmetic and the pure parts of its recipe search.

Pure numpy. The model-in-the-loop part (one pruned forward per sample and alpha, recording counts
and costs) lives with the calibration code; this module holds what decides, from numbers alone:

* :func:`layer_prune_set`: the per-layer deletion rule (conformance README §1).
* :func:`visual_cost` / :func:`rest_flops`: the reference's visual-token cost model (README §3),
  kept for comparison with published figures. Our own budget uses the exact model of
  :mod:`recipe_compiler.flops`.
* :func:`stopping_layer`: the after-the-fact budget check of one alpha evaluation.
* :func:`bisect_alpha`: the bisection on alpha; it returns the last **feasible** alpha (the
  reference emits the recipe of the last alpha evaluated, which may miss the budget — we do not).
* :func:`recipe_from_counts`: recipe = floor of the mean pruned count per layer, up to the stop.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

__all__ = [
    "layer_prune_set",
    "visual_cost",
    "rest_flops",
    "stopping_layer",
    "bisect_alpha",
    "recipe_from_counts",
]


def _removable_count(scores: np.ndarray, order: np.ndarray, target: float) -> int:
    """Largest ``k`` (at most ``v - 1``) such that removing the ``k`` first of ``order`` keeps
    ``sum(scores) - removed >= target``; 0 when the full sum is already below the target."""
    v = scores.size
    removed = np.concatenate(([0.0], np.cumsum(scores[order][: v - 1])))  # removal of i = 0..v-1
    ok = (float(np.sum(scores)) - removed) >= target
    # The reference scans i = 0..v-1 and, at the first i whose removal drops below the target,
    # deletes max(i - 1, 0). If no i drops below, its variable is stale; the rule says v - 1.
    leading = v if bool(np.all(ok)) else int(np.argmin(ok))
    return max(leading - 1, 0)


def _check_scores(values: Any, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array over visual tokens, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} holds non-finite values; pass the scores of the live visual tokens only")
    return arr


def layer_prune_set(
    cross: Any, self_scores: Any, w_cross: float, w_self: float, alpha: float
) -> np.ndarray:
    """The visual tokens FitPrune's recipe search removes at one layer of one sample.

    ``k_c`` = the largest number of smallest-``cross`` tokens (stable ascending order) whose removal
    keeps ``sum(cross) - removed >= w_cross - w_cross·alpha`` (0 if the sum is already below; at
    most ``v - 1``); ``k_s`` likewise for ``self_scores``. The tokens removed are those among both
    the first ``k_c`` of the cross order and the first ``k_s`` of the self order. Sums are taken
    in float64.

    Args:
        cross: float ``[v]``, mean over text queries of the head-max attention to each live
            visual token.
        self_scores: float ``[v]``, sum over visual queries of that attention, divided by ``v``.
        w_cross: the sum of ``cross`` for this layer on the unpruned model.
        w_self: the sum of ``self_scores`` for this layer on the unpruned model.
        alpha: the fraction of attention mass allowed to go, in ``[0, 1]``.

    Returns:
        int64 sorted indices (into ``cross``) of the pruned tokens.

    Example:
        >>> layer_prune_set([0.1, 0.5, 0.2, 0.2], [0.05, 0.6, 0.3, 0.05], 1.0, 1.0, 0.35)
        array([0])
    """
    c = _check_scores(cross, "cross")
    s = _check_scores(self_scores, "self_scores")
    if c.shape != s.shape:
        raise ValueError(f"cross {c.shape} and self_scores {s.shape} must cover the same visual tokens")
    a = float(alpha)
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"alpha={alpha!r} is out of range; it must lie in [0, 1]")
    if c.size == 0:
        return np.zeros(0, dtype=np.int64)
    wc, ws = float(w_cross), float(w_self)
    order_c = np.argsort(c, kind="stable")
    order_s = np.argsort(s, kind="stable")
    k_c = _removable_count(c, order_c, wc - wc * a)
    k_s = _removable_count(s, order_s, ws - ws * a)
    pruned = np.intersect1d(order_c[:k_c], order_s[:k_s])
    return pruned.astype(np.int64)


def _check_recipe(pruned_per_layer: Any, n_visual: int) -> list[int]:
    arr = np.asarray(pruned_per_layer)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iuf"):
        raise ValueError(f"pruned_per_layer must be a 1-D list of per-layer counts, got {pruned_per_layer!r}")
    counts = [int(x) for x in arr.tolist()]
    if any(float(x) != float(y) for x, y in zip(counts, arr.tolist())) or any(x < 0 for x in counts):
        raise ValueError(f"pruned_per_layer must hold non-negative whole counts, got {pruned_per_layer!r}")
    if sum(counts) > n_visual:
        raise ValueError(
            f"pruned_per_layer removes {sum(counts)} tokens but only n_visual={n_visual} exist; lower the counts"
        )
    return counts


def visual_cost(
    pruned_per_layer: Any, n_visual: int = 576, hidden: int = 4096, intermediate: int = 11008
) -> int:
    """FitPrune's cost of a recipe: visual-token multiply-adds only (conformance README §3).

    Tokens pruned at layer ``l`` are removed after that layer's attention, so they skip its
    o_proj and MLP. Per layer, with ``v_in`` tokens entering and ``v_out = v_in - pruned[l]``
    leaving: ``C = 3·v_in·d² + 2·v_in²·d + v_out·d² + 3·d·m·v_out`` (q/k/v projections, scores
    and values over visual keys only, o_proj, MLP). No factor 2, no text tokens. Exact integers.
    For the published LLaVA-1.5 recipes this equals the reference's ``scheme_flops`` exactly.

    Args:
        pruned_per_layer: int ``[num_layers]``, tokens pruned at (the end of) each layer.
        n_visual: visual tokens entering layer 0.
        hidden: model width ``d``.
        intermediate: MLP width ``m``.

    Returns:
        The total over layers (Python int).

    Example:
        >>> visual_cost([0] * 32)
        3817152184320
        >>> visual_cost([1, 0], n_visual=2, hidden=1, intermediate=1)  # (6+8+1+3) + (3+2+1+3)
        27
    """
    counts = _check_recipe(pruned_per_layer, int(n_visual))
    d, m = int(hidden), int(intermediate)
    v_in = int(n_visual)
    total = 0
    for p in counts:
        v_out = v_in - p
        total += 3 * v_in * d * d + 2 * v_in * v_in * d + v_out * d * d + 3 * d * m * v_out
        v_in = v_out
    return total


def rest_flops(
    tk: int, layer_idx: int, num_layers: int = 32, hidden: int = 4096, intermediate: int = 11008
) -> int:
    """The reference's forecast of the cost still ahead at layer ``layer_idx`` with ``tk`` tokens.

    In the same units as :func:`visual_cost`: the o_proj and MLP of layer ``layer_idx`` for ``tk``
    tokens, plus every later layer run in full with ``tk`` tokens and no further pruning:
    ``tk·(d² + 3·d·m) + (num_layers − 1 − layer_idx)·(4·tk·d² + 2·tk²·d + 3·d·m·tk)``.
    The reference adds this to what it already spent (including layer ``layer_idx``'s q/k/v
    projections and attention) and stops the search when the per-sample mean is within budget.

    Args:
        tk: visual tokens alive (non-negative).
        layer_idx: the layer being decided, ``0 <= layer_idx < num_layers``.
        num_layers: decoder layers.
        hidden: model width ``d``.
        intermediate: MLP width ``m``.

    Returns:
        Multiply-adds (Python int).

    Example:
        >>> rest_flops(1, 31)
        152043520
    """
    tk, layer_idx, L = int(tk), int(layer_idx), int(num_layers)
    if tk < 0 or not 0 <= layer_idx < L:
        raise ValueError(f"rest_flops needs tk >= 0 and 0 <= layer_idx < {L}, got tk={tk}, layer_idx={layer_idx}")
    d, m = int(hidden), int(intermediate)
    tail = tk * d * d + 3 * d * m * tk
    per_layer = 3 * tk * d * d + 2 * tk * tk * d + tk * d * d + 3 * d * m * tk
    return tail + (L - 1 - layer_idx) * per_layer


def stopping_layer(costs_per_sample: Any, budget: float) -> int | None:
    """The layer at which FitPrune's search stops pruning, from per-sample costs.

    Args:
        costs_per_sample: float ``[S, P, 2]`` with ``P`` check points (``P = L``, or ``L + 1`` to
            include the point after the last layer). For sample ``s`` and check point ``l``:
            ``[s, l, 0]`` = FLOPs already spent in layers ``< l``; ``[s, l, 1]`` = FLOPs of layers
            ``l .. L-1`` if nothing more is pruned from the count entering layer ``l`` (0 at
            ``l = L``).
        budget: allowed mean FLOPs per sample.

    Returns:
        The first ``l`` with ``mean_s(spent + remaining) <= budget``, or None if there is none.

    Example:
        >>> costs = [[[0, 10], [4, 5], [7, 1]], [[0, 10], [3, 6], [6, 2]]]
        >>> stopping_layer(costs, 9.0), stopping_layer(costs, 8.0), stopping_layer(costs, 7.0)
        (1, 2, None)
    """
    costs = np.asarray(costs_per_sample, dtype=np.float64)
    if costs.ndim != 3 or costs.shape[2] != 2 or costs.shape[0] == 0:
        raise ValueError(f"costs_per_sample must have shape [S, P, 2] with S >= 1, got {costs.shape}")
    if not np.all(np.isfinite(costs)):
        raise ValueError("costs_per_sample holds non-finite values; every check point needs a cost")
    total = np.mean(costs[:, :, 0] + costs[:, :, 1], axis=0)
    hits = np.nonzero(total <= float(budget))[0]
    return int(hits[0]) if hits.size else None


def bisect_alpha(
    is_feasible: Callable[[float], bool], tol: float = 0.01
) -> tuple[float | None, list[tuple[float, bool]]]:
    """FitPrune's bisection on alpha, returning the last feasible alpha evaluated.

    ``lo, hi = 0, 1``; evaluate ``mid = (lo + hi) / 2``; feasible → ``hi = mid`` else ``lo = mid``;
    repeat while ``hi - lo > tol`` (7 evaluations for 0.01). If no evaluated alpha was feasible,
    ``alpha = 1`` is evaluated once more.

    Args:
        is_feasible: runs the search at one alpha and says whether it met the budget.
        tol: final bracket width, in ``(0, 1)``.

    Returns:
        ``(alpha, trace)``: the last feasible alpha evaluated (None if not even ``alpha = 1``
        was), and every ``(alpha, feasible)`` evaluated, in order.

    Example:
        >>> alpha, trace = bisect_alpha(lambda a: a >= 0.3)
        >>> alpha, len(trace)
        (0.3046875, 7)
    """
    tol = float(tol)
    if not 0.0 < tol < 1.0:
        raise ValueError(f"tol={tol!r} is out of range; it must lie in (0, 1)")
    lo, hi = 0.0, 1.0
    trace: list[tuple[float, bool]] = []
    best: float | None = None
    while hi - lo > tol * (1.0 + 1e-9):
        mid = (lo + hi) / 2.0
        ok = bool(is_feasible(mid))
        trace.append((mid, ok))
        if ok:
            hi, best = mid, mid
        else:
            lo = mid
    if best is None:
        ok = bool(is_feasible(1.0))
        trace.append((1.0, ok))
        best = 1.0 if ok else None
    return best, trace


def recipe_from_counts(pruned_counts: Any, stop: int | None) -> np.ndarray:
    """The FitPrune recipe: floor of the mean pruned count per layer, zero from the stop on.

    Args:
        pruned_counts: int or float ``[S, L]``, tokens each sample pruned at the end of layer l.
        stop: the stopping layer (:func:`stopping_layer`); layers ``>= stop`` prune nothing.
            None keeps every layer.

    Returns:
        int64 ``[L]``.

    Example:
        >>> recipe_from_counts([[3, 2, 5], [4, 1, 5]], stop=2).tolist()
        [3, 1, 0]
    """
    counts = np.asarray(pruned_counts)
    if counts.ndim != 2 or counts.shape[0] == 0 or counts.dtype.kind not in "iuf":
        raise ValueError(f"pruned_counts must be a numeric [S, L] array with S >= 1, got shape {counts.shape}")
    if counts.dtype.kind == "f" and not np.all(np.isfinite(counts)):
        raise ValueError("pruned_counts holds non-finite values")
    if np.any(counts < 0):
        raise ValueError(f"pruned_counts must be non-negative, got minimum {counts.min()}")
    L = counts.shape[1]
    if stop is not None:
        stop = int(stop)
        if not 0 <= stop <= L:
            raise ValueError(f"stop={stop} is out of range; it must lie in [0, {L}] or be None")
    counts = counts.copy()
    if stop is not None:
        counts[:, stop:] = 0
    S = counts.shape[0]
    if counts.dtype.kind in "iu":
        return (np.sum(counts.astype(np.int64), axis=0) // S).astype(np.int64)
    return np.floor(np.sum(counts.astype(np.float64), axis=0) / S).astype(np.int64)

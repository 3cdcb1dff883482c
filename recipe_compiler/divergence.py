"""Attention divergence of keeping the top-k visual tokens at each layer: separable and nested.

Pure numpy. METHODS.md §2: keeping a set of visual tokens entering layer ``l`` loses the attention
mass the dropped ones carried in layer ``l``'s text→visual (``cross``) and visual→visual
(``self_attn``) distributions; the divergence is ``−log(1 − lost)`` (the KL of the renormalised
kept distribution to the original), averaged over the two. Text-only statistics (the ``text``
objective) hold only ``cross``: the divergence is then its term alone. The ranking entering layer ``l`` comes
from layer ``l − 1``'s statistics, as at run time (the scorer sees the attention of the layer
before the cut).

Two forms (docs/methods.md, "Nested selection"):

* :func:`divergence_table` is **separable**: the set entering ``l`` is the top ``k_l`` of *all*
  tokens by layer ``l − 1``'s ranking, independently of earlier cuts. The table searches
  (optimal, gsearch, psigmoid) minimise ``Σ_l table[l, k_l]`` exactly.
* :func:`nested_keep_sets` / :func:`nested_divergence` apply **the runtime's rule**: at each layer
  where the schedule's count falls, keep the top ``k_l`` *of the survivors* (a token dropped
  earlier is gone), ranked by layer ``l − 1``'s statistics, ties as the runtime breaks them. This
  is what a recipe executes, scored on the unpruned model's attention; the verification pass
  measures the same quantity on the sets the runtime really kept
  (:func:`kept_set_divergence`). The two forms agree up to and including the first cut, and at
  every layer whose separable top-k happens to lie inside the survivors (always, if one ranking
  served every layer); after the first cut they differ in general, even where the count stays:
  the separable table re-ranks every layer and so may bring a dropped token back. No separable
  table can equal the runtime for every schedule: a nested rule whose loss at ``l`` depends on
  ``k_l`` alone needs ``set(l, k) ⊆ set(l − 1, k)``, i.e. one fixed ranking for every layer.

Ties: among equal scores the **later** position is kept (the runtime's
:func:`runtime.scoring.keep_top` drops the earlier tokens first); :func:`order_best_first` is the
one place that says so here, and a test pins it to the runtime.

Counts are for the reference count ``V = stats.max_visual``; a sample with ``n_visual`` tokens
keeps ``round_half_up(k·n_visual/V)`` (:func:`recipe_compiler.flops.scale_counts`).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from recipe_compiler.flops import scale_counts
from recipe_compiler.statistics import Statistics
from runtime.methods.scorers import SCORERS

__all__ = [
    "ranking_scores",
    "order_best_first",
    "divergence_table",
    "schedule_objective",
    "nested_keep_sets",
    "kept_set_divergence",
    "nested_divergence",
]

_MIN_KEPT = 1e-6  # floor of the kept mass inside the log: caps one term at −log(1e-6) ≈ 13.8


def _check_scorer(scorer: str) -> str:
    if scorer not in SCORERS:
        raise ValueError(f"unknown scorer {scorer!r}; choose one of {', '.join(SCORERS)}")
    return scorer


def ranking_scores(stats: Statistics, scorer: str) -> np.ndarray:
    """Scores that choose the visual tokens surviving into each layer (higher is kept).

    Args:
        stats: calibration statistics.
        scorer: a :data:`runtime.methods.scorers.SCORERS` name; its ``from_statistics`` gives the
            score (``fitprune``: ``cross·self_attn·n_text`` = ``(Σ_text A)·(Σ_visual A / v)``;
            ``text-mean``: ``cross``; ``last-token``: ``last``).

    Returns:
        float64 ``[S, L, V]``; row ``l >= 1`` is computed from layer ``l − 1``'s statistics, row 0
        is ``+inf`` (nothing is ranked before layer 0). Entries beyond a sample's visual count stay
        NaN.

    Example:
        >>> import numpy as np
        >>> a = np.array([[[0.2, 0.1], [0.3, 0.4]]], dtype=np.float32)
        >>> st = Statistics(a, a, a, np.array([2]), np.array([3]), np.array([10]))
        >>> ranking_scores(st, "text-mean")[0].tolist()
        [[inf, inf], [0.20000000298023224, 0.10000000149011612]]
    """
    _check_scorer(scorer)
    S, L, V = stats.cross.shape
    out = np.empty((S, L, V), dtype=np.float64)
    out[:, 1:] = _base_scores(stats, scorer, _ranking_layers(stats)[1:])
    valid = np.arange(V)[None, :] < np.asarray(stats.n_visual)[:, None]  # [S, V]
    out[:, 0] = np.where(valid, np.inf, np.nan)
    return out


def _base_scores(stats: Statistics, scorer: str, layers: Any) -> np.ndarray:
    """The scorer's value from the statistics of ``layers`` (float64 [S, len(layers), V])."""
    if stats.text_only and SCORERS[scorer].needs_visual_rows:
        raise ValueError(f"scorer {scorer!r} ranks by the visual query rows, which text-only statistics do not hold")
    self_attn = None if stats.text_only else stats.self_attn[:, layers]
    return SCORERS[scorer].from_statistics(stats.cross[:, layers], self_attn, stats.last[:, layers], stats.n_text)


def _ranking_layers(stats: Statistics) -> np.ndarray:
    """int [L]: for each layer ``l >= 1``, the layer whose statistics rank the cut entering it.

    ``l − 1``, or the last earlier layer with statistics where ``l − 1`` has none (a layer without
    attention rows, e.g. Qwen3.5's linear attention: its statistics are all NaN, and it contributes
    no divergence of its own). Entry 0 is unused (0).
    """
    measured = ~np.all(np.isnan(stats.cross), axis=(0, 2))
    source = np.zeros(stats.cross.shape[1], dtype=np.int64)
    last = 0
    for layer in range(1, source.size):
        if measured[layer - 1]:
            last = layer - 1
        source[layer] = last
    return source


def _normalised(values: np.ndarray) -> np.ndarray:
    """Per (sample, layer) distribution over visual tokens; NaN → 0; all-zero rows stay zero."""
    x = np.nan_to_num(values.astype(np.float64), nan=0.0)
    total = np.sum(x, axis=-1, keepdims=True)
    return np.divide(x, total, out=np.zeros_like(x), where=total > 0)


def order_best_first(key: np.ndarray) -> np.ndarray:
    """Indices that sort the last axis best first: ascending ``key``, ties by **descending** position.

    ``key`` is the negated score (``+inf`` for tokens that must come last). This is the runtime's
    tie rule (:func:`runtime.scoring.keep_top` drops the earliest of equal scores first), so a kept
    prefix of this order is exactly the set the runtime keeps.

    Example:
        >>> order_best_first(np.array([-1.0, -2.0, -1.0, np.inf])).tolist()  # 1 best; the tie 0/2 keeps 2
        [1, 2, 0, 3]
    """
    n = key.shape[-1]
    reversed_order = np.argsort(key[..., ::-1], axis=-1, kind="stable")
    return n - 1 - reversed_order


def divergence_table(
    stats: Statistics, scorer: str = "fitprune", v_ref: int | None = None, survivors: np.ndarray | None = None
) -> np.ndarray:
    """Mean divergence of keeping the ``k`` top-ranked visual tokens entering each layer.

    For sample ``s`` at layer ``l >= 1``: rank the visual tokens by :func:`ranking_scores`
    (highest kept; among ties the later position, as the runtime), keep ``k_s = round_half_up(k·n_visual/G)``
    where ``G`` is the grid (``v_ref``, default the widest sample ``V``);
    ``lost_cross`` = mass of ``cross[s, l] / sum(cross[s, l])`` on the dropped tokens, likewise
    ``lost_self``; ``D_s = ½·(−log max(1 − lost_cross, 1e-6) − log max(1 − lost_self, 1e-6))``
    (text-only statistics: ``D_s = −log max(1 − lost_cross, 1e-6)``).

    Args:
        stats: calibration statistics.
        scorer: a :data:`runtime.methods.scorers.SCORERS` name.
        v_ref: the recipe's reference visual-token count (grid size); samples with other counts
            (other image sizes) keep the same fraction. Default: ``V``.
        survivors: optional bool ``[S, V]``, the tokens a pre-LLM stage lets into layer 0. Counts
            are then relative to each sample's survivors (``k_s = round_half_up(k·n_post/G)``),
            only survivors are ranked, and the pre-dropped tokens' mass counts as lost at every
            layer, row 0 included (``[0, G]`` = the layer-0 loss of the stage alone).

    Returns:
        float64 ``[L, G + 1]``: ``[l, k]`` = mean over samples of ``D_s``. Row 0 is 0 at ``k = G``
        and ``+inf`` elsewhere (nothing can be pruned before layer 0 runs). Each row is
        non-increasing in ``k``.

    Example:
        >>> import numpy as np
        >>> a = np.array([[[0.5, 0.5], [0.75, 0.25]]], dtype=np.float32)
        >>> st = Statistics(a, a, a, np.array([2]), np.array([3]), np.array([10]))
        >>> divergence_table(st, "text-mean").round(4).tolist()  # layer 1 keeps token 1 (the later of a tie)
        [[inf, inf, 0.0], [13.8155, 1.3863, 0.0]]
    """
    _check_scorer(scorer)
    S, L, V = stats.cross.shape
    n_visual = np.asarray(stats.n_visual, dtype=np.int64)
    if n_visual.shape != (S,) or np.any(n_visual < 0) or np.any(n_visual > V):
        raise ValueError(f"stats.n_visual must hold one count in [0, {V}] per sample, got {n_visual!r}")
    grid = V if v_ref is None else int(v_ref)
    if grid < 1:
        raise ValueError(f"v_ref must be a positive token count, got {v_ref!r}")
    positions = np.arange(V)
    alive = positions[None, :] < n_visual[:, None]
    if survivors is not None:
        survivors = np.asarray(survivors, dtype=bool)
        if survivors.shape != (S, V):
            raise ValueError(f"survivors must be a bool [S, V] = {(S, V)} mask, got {survivors.shape}")
        alive = alive & survivors
    n_post = alive.sum(axis=1)
    table = np.zeros((L, grid + 1), dtype=np.float64)
    table[0, :grid] = np.inf
    if survivors is not None:
        table[0, grid] = _pre_dropped_divergence(stats, alive, n_visual)
    if L == 1:
        return table

    ks = scale_counts(np.arange(grid + 1)[None, :], n_post[:, None], grid)  # [S, G+1], each <= n_post[s]
    source = _ranking_layers(stats)
    # Layers in chunks of about 2^20 entries: fast (cache-sized) and light on memory.
    step = max(1, (1 << 20) // max(1, S * V))
    for start in range(1, L, step):
        stop = min(L, start + step)
        n = stop - start
        # The cut entering layer l is ranked by layer l-1's statistics (the last layer with attention before l).
        scores = _base_scores(stats, scorer, source[start:stop])  # [S, n, V]
        valid = positions[None, None, :] < n_visual[:, None, None]
        # Dropped last: positions beyond the sample's count (never kept, no mass) and NaN scores.
        key = np.where(valid & alive[:, None, :] & ~np.isnan(scores), -scores, np.inf)
        order = order_best_first(key)  # best first; ties: the later position (the runtime's rule)
        index = np.broadcast_to(ks[:, None, :], (S, n, grid + 1))
        total = np.zeros((S, n, grid + 1), dtype=np.float64)
        for values in stats.distributions:
            p = np.where(valid, _normalised(values[:, start:stop]), 0.0)
            p_sorted = np.take_along_axis(p, order, axis=-1)
            # lost(k) = mass of ranks k..V-1: a reverse cumulative sum, exactly 0 at k = V.
            lost = np.zeros((S, n, V + 1), dtype=np.float64)
            lost[..., :V] = np.cumsum(p_sorted[..., ::-1], axis=-1)[..., ::-1]
            lost_at_k = np.take_along_axis(lost, index, axis=-1)
            total += -np.log(np.maximum(1.0 - lost_at_k, _MIN_KEPT))
        table[start:stop] = np.mean(total, axis=0) / len(stats.distributions)
    return table


def _pre_dropped_divergence(stats: Statistics, alive: np.ndarray, n_visual: np.ndarray) -> float:
    """Mean layer-0 divergence of dropping the non-``alive`` tokens before the language model."""
    valid = np.arange(stats.cross.shape[2])[None, :] < n_visual[:, None]
    total = np.zeros(stats.cross.shape[0], dtype=np.float64)
    for values in stats.distributions:
        p = np.where(valid, _normalised(values[:, 0]), 0.0)
        lost = np.sum(np.where(alive, 0.0, p), axis=-1)
        total += -np.log(np.maximum(1.0 - lost, _MIN_KEPT))
    return float(np.mean(total) / len(stats.distributions))


def schedule_objective(table: Any, keep_counts: Any) -> float:
    """Total divergence of a schedule: ``Σ_l table[l, keep_counts[l]]``.

    Args:
        table: float ``[L, V + 1]`` from :func:`divergence_table`.
        keep_counts: int ``[L]`` visual tokens (reference count) alive entering each layer.

    Returns:
        The sum (float; ``inf`` if the schedule prunes before layer 0).

    Example:
        >>> schedule_objective([[float("inf"), 0.0], [0.7, 0.0]], [1, 0])
        0.7
    """
    t = np.asarray(table, dtype=np.float64)
    k = np.asarray(keep_counts)
    if t.ndim != 2 or k.shape != (t.shape[0],):
        raise ValueError(f"keep_counts {k.shape} needs one count per table row; table has shape {t.shape}")
    if k.dtype.kind not in "iu" or np.any(k < 0) or np.any(k >= t.shape[1]):
        raise ValueError(f"keep_counts must be integers in [0, {t.shape[1] - 1}], got {k.tolist()}")
    return float(np.sum(t[np.arange(t.shape[0]), k]))


def _alive_at_layer_zero(stats: Statistics, survivors: np.ndarray | None) -> np.ndarray:
    """bool [S, V]: the visual tokens entering layer 0 (a pre-LLM stage's survivors, if any)."""
    S, _, V = stats.cross.shape
    n_visual = np.asarray(stats.n_visual, dtype=np.int64)
    if n_visual.shape != (S,) or np.any(n_visual < 0) or np.any(n_visual > V):
        raise ValueError(f"stats.n_visual must hold one count in [0, {V}] per sample, got {n_visual!r}")
    alive = np.arange(V)[None, :] < n_visual[:, None]
    if survivors is not None:
        survivors = np.asarray(survivors, dtype=bool)
        if survivors.shape != (S, V):
            raise ValueError(f"survivors must be a bool [S, V] = {(S, V)} mask, got {survivors.shape}")
        alive = alive & survivors
    return alive


def nested_keep_sets(
    stats: Statistics,
    scorer: str,
    keep_counts: Any,
    v_ref: int | None = None,
    survivors: np.ndarray | None = None,
) -> np.ndarray:
    """The visual tokens the runtime keeps entering each layer, simulated on the statistics.

    The runtime's rule (``runtime.pruner.RecipePolicy``): a sample with ``n`` visual tokens after
    the pre-LLM stage keeps ``k_s(l) = round_half_up(keep_counts[l]·n/G)`` entering layer ``l``; at
    each layer where ``keep_counts`` falls it keeps the ``k_s(l)`` best **survivors** by the
    scorer on layer ``l − 1``'s attention (ties: the later position), and the set carries over
    unchanged to the layers where the count does not fall. The scores come from the unpruned
    model's statistics; at run time the scores of cuts after the first come from the pruned
    model's attention, the one thing no offline table can know.

    Args:
        stats: calibration statistics.
        scorer: one of :data:`SCORERS`.
        keep_counts: int ``[L]`` reference counts (non-increasing, ``[0] == G``).
        v_ref: the reference count ``G`` (default: ``V``).
        survivors: optional bool ``[S, V]``, the tokens a pre-LLM stage lets into layer 0.

    Returns:
        bool ``[S, L, V]``: entry ``[s, l, j]`` is True if visual token ``j`` of sample ``s`` enters
        layer ``l``.

    Example:
        >>> import numpy as np
        >>> a = np.array([[[0.1, 0.6, 0.3], [0.5, 0.2, 0.3], [0.2, 0.3, 0.5]]], dtype=np.float32)
        >>> st = Statistics(a, a, a, np.array([3]), np.array([3]), np.array([10]))
        >>> nested_keep_sets(st, "text-mean", [3, 2, 1]).astype(int)[0].tolist()  # layer 2 ranks 1, 2 only
        [[1, 1, 1], [0, 1, 1], [0, 0, 1]]
    """
    _check_scorer(scorer)
    S, L, V = stats.cross.shape
    grid = V if v_ref is None else int(v_ref)
    keep = np.asarray(keep_counts)
    if (keep.shape != (L,) or keep.dtype.kind not in "iu" or np.any(keep < 0) or np.any(keep > grid)
            or np.any(np.diff(keep) > 0) or keep[0] != grid):
        raise ValueError(f"keep_counts must be {L} non-increasing integers in [0, {grid}] starting at {grid} "
                         f"(nothing is pruned before layer 0), got {keep.tolist()}")
    alive = _alive_at_layer_zero(stats, survivors)
    counts = scale_counts(keep[None, :], alive.sum(axis=1)[:, None], grid)  # [S, L]
    out = np.empty((S, L, V), dtype=bool)
    out[:, 0] = alive
    for l in range(1, L):
        if keep[l] < keep[l - 1]:
            scores = _base_scores(stats, scorer, _ranking_layers(stats)[l:l + 1])[:, 0]  # [S, V]
            key = np.where(alive, -np.nan_to_num(scores, nan=-np.inf), np.inf)
            order = order_best_first(key)
            rank = np.empty_like(order)
            np.put_along_axis(rank, order, np.arange(V)[None, :].repeat(S, axis=0), axis=-1)
            alive = alive & (rank < counts[:, l : l + 1])
        out[:, l] = alive
    return out


def kept_set_divergence(stats: Statistics, alive: np.ndarray) -> np.ndarray:
    """Mean divergence at each layer of the visual tokens ``alive`` entering it.

    ``D_s,l = ½·(−log max(1 − lost_cross, 1e-6) − log max(1 − lost_self, 1e-6))`` where ``lost``
    is the mass of layer ``l``'s normalised ``cross`` (``self_attn``) on the tokens not alive, the
    definition :func:`divergence_table` uses for a top-k set (text-only statistics: the ``cross``
    term alone).

    Args:
        stats: calibration statistics.
        alive: bool ``[S, L, V]``, e.g. from :func:`nested_keep_sets` or the verification pass.

    Returns:
        float64 ``[L]``: mean over samples at each layer (sum it for a schedule's total).

    Example:
        >>> import numpy as np
        >>> a = np.array([[[0.5, 0.5], [0.75, 0.25]]], dtype=np.float32)
        >>> st = Statistics(a, a, a, np.array([2]), np.array([3]), np.array([10]))
        >>> kept_set_divergence(st, np.array([[[True, True], [True, False]]])).round(4).tolist()
        [0.0, 0.2877]
    """
    S, L, V = stats.cross.shape
    alive = np.asarray(alive, dtype=bool)
    if alive.shape != (S, L, V):
        raise ValueError(f"alive must be a bool [S, L, V] = {(S, L, V)} array, got {alive.shape}")
    valid = (np.arange(V)[None, :] < np.asarray(stats.n_visual)[:, None])[:, None, :]
    total = np.zeros((S, L), dtype=np.float64)
    for values in stats.distributions:
        p = np.where(valid, _normalised(values), 0.0)
        lost = np.sum(np.where(alive, 0.0, p), axis=-1)
        total += -np.log(np.maximum(1.0 - lost, _MIN_KEPT))
    return np.mean(total, axis=0) / len(stats.distributions)


def nested_divergence(
    stats: Statistics,
    scorer: str,
    keep_counts: Any,
    v_ref: int | None = None,
    survivors: np.ndarray | None = None,
) -> float:
    """Total divergence of what the runtime executes for ``keep_counts``, on the statistics.

    ``Σ_l kept_set_divergence(stats, nested_keep_sets(...))[l]``: the prediction the
    verification pass checks (it scores the sets the runtime really kept the same way).

    Example:
        >>> import numpy as np
        >>> a = np.array([[[0.1, 0.6, 0.3], [0.5, 0.2, 0.3], [0.2, 0.3, 0.5]]], dtype=np.float32)
        >>> st = Statistics(a, a, a, np.array([3]), np.array([3]), np.array([10]))
        >>> round(nested_divergence(st, "text-mean", [3, 2, 1]), 4)  # the separable table says 2.3026 (token 0 back)
        1.3863
    """
    alive = nested_keep_sets(stats, scorer, keep_counts, v_ref=v_ref, survivors=survivors)
    return float(np.sum(kept_set_divergence(stats, alive)))

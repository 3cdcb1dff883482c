"""Pre-LLM scorers: which visual tokens go before the language model (METHODS.md §4).

Pure functions on tensors (torch only; no hooks, no I/O). Every ``*_keep`` function returns a bool
mask over the tokens it was given, so kept tokens stay in their original order; the caller gathers
``features[mask]``. Top-k selections break ties by position (the earlier token wins).

* **g-prune** — :func:`gprune_scores`, :func:`gprune_keep`: information propagation on the
  cosine-similarity graph of the projected visual features.
* **fopru-rank / fopru-row** — :func:`fopru_significance`, :func:`fopru_rank_keep`,
  :func:`fopru_row_keep`: significance from the vision encoder's attention at the feature layer.
* **cls-inflection** — :func:`cls_similarity`, :func:`knee_index`, :func:`inflection_keep`,
  :func:`cls_inflection_keep`: keep the head of the sorted patch–CLS similarity curve, cut at its
  knee (dynamic count); the knee detector is Kneedle or maximum curvature (:data:`DETECTORS`).
"""
from __future__ import annotations

import math

import torch

from .methods.detectors import DETECTORS

__all__ = [
    "gprune_scores",
    "gprune_keep",
    "fopru_significance",
    "fopru_rank_keep",
    "fopru_row_keep",
    "cls_similarity",
    "knee_index",
    "inflection_keep",
    "cls_inflection_keep",
    "DETECTORS",
    "stage_count",
]


_MASKED = -1e4  # "large negative" logit of a pruned edge: exp underflows to exactly 0 after /τ
_EPS = 1e-12


def _check_matrix(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim != 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a 2-D tensor (tokens, dim), got {shape}")
    return x


def _check_count(k: int, available: int, name: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= available:
        raise ValueError(f"{name}={k!r} is out of range; it must be an integer in [0, {available}]")
    return k


def stage_count(keep_ratio: float, n: int) -> int:
    """Tokens a fixed-ratio stage keeps of a view's ``n``: ``round_half_up(keep_ratio · n)``.

    Example:
        >>> stage_count(0.5, 5), stage_count(0.25, 6)
        (3, 2)
    """
    return min(int(n), max(0, int(math.floor(float(keep_ratio) * int(n) + 0.5))))


def _topk_mask(scores: torch.Tensor, k: int, eligible: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask of the ``k`` highest scores (ties: lower position first) among ``eligible``."""
    n = scores.shape[0]
    s = scores.detach().float()
    if eligible is not None:
        s = torch.where(eligible, s, torch.full_like(s, -math.inf))
    s = torch.nan_to_num(s, nan=-math.inf)
    order = torch.sort(s, descending=True, stable=True).indices  # stable: equal scores by position
    mask = torch.zeros(n, dtype=torch.bool, device=scores.device)
    mask[order[:k]] = True
    return mask


# --- G-Prune ---


def gprune_scores(
    features: torch.Tensor, threshold: float = 0.5, temperature: float = 0.03, steps: int = 5
) -> torch.Tensor:
    """G-Prune's information-propagation score of each visual token.

    ``S = X̂X̂ᵀ`` (cosine similarity); an edge ``(i, j)`` exists where ``S_ij >= threshold``; the
    diagonal is always an edge (``S_ii = 1``; forced for an all-zero feature). Edge logits are
    ``S_ij / temperature``, missing edges get a large negative logit (``−1e4``: weight exactly 0),
    and a row softmax gives the transition matrix ``A``. The information ``w_j = ‖x_j‖₂`` is
    propagated ``steps`` times, ``w ← w·A`` (``w'_j = Σ_i w_i·A_ij``), and divided by the node
    degree: the number of non-zero entries in the token's row of the thresholded ``S``, **the
    diagonal included** (an isolated token has degree 1, so no division by zero). Computed in
    float32.

    Args:
        features: (N, D) projected visual features of one view.
        threshold: similarity below which an edge is dropped, in [-1, 1] (0.5 in G-Prune's code).
        temperature: softmax temperature τ > 0.
        steps: propagation steps t >= 0.

    Returns:
        (N,) float32 scores; higher is kept.

    Raises:
        ValueError: features not 2-D, or a parameter out of range.

    Example:
        >>> x = torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.99, 0.0], [0.0, 2.0]])
        >>> gprune_scores(x).argmax().item()  # the distinct token beats the three near-duplicates
        3
    """
    x = _check_matrix(features, "features").detach().float()
    if not -1.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold={threshold!r} is out of range; it must be in [-1, 1]")
    if not float(temperature) > 0.0 or not math.isfinite(float(temperature)):
        raise ValueError(f"temperature={temperature!r} is out of range; it must be a positive number")
    _check_count(steps, 10**6, "steps")
    n = x.shape[0]
    norms = x.norm(dim=1)
    unit = x / norms.clamp_min(_EPS)[:, None]
    sim = unit @ unit.T
    edges = (sim >= threshold) | torch.eye(n, dtype=torch.bool, device=x.device)
    logits = torch.where(edges, sim / temperature, torch.full_like(sim, _MASKED))
    transition = torch.softmax(logits, dim=1)
    w = norms
    for _ in range(steps):
        w = w @ transition
    degree = edges.sum(dim=1).float()
    return w / degree


def gprune_keep(
    features: torch.Tensor, k: int, protected: torch.Tensor | None = None, **params: float
) -> torch.Tensor:
    """G-Prune selection: the ``k`` best-scored tokens plus every protected token.

    Protected tokens (LLaVA-NeXT's row-end newlines) are always kept, are **not** counted in
    ``k``, and are left out of the graph (they are not image content; the scores are computed on
    the other tokens only). One call handles one view; LLaVA-NeXT calls it once per view (base
    image, each high-res crop).

    Args:
        features: (N, D) projected visual features of one view.
        k: unprotected tokens to keep, in ``[0, N − #protected]``.
        protected: optional (N,) bool mask of tokens that are always kept.
        **params: ``threshold``, ``temperature``, ``steps`` of :func:`gprune_scores`.

    Returns:
        (N,) bool mask (original order): ``k`` top-scored unprotected tokens (ties: earlier
        first) or the protected ones.

    Raises:
        ValueError: bad shapes, ``k`` out of range, or an unknown parameter.

    Example:
        >>> x = torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 5.0], [0.0, 1.0]])
        >>> gprune_keep(x, 1, protected=torch.tensor([False, False, True, False])).tolist()
        [False, False, True, True]
    """
    x = _check_matrix(features, "features")
    n = x.shape[0]
    unknown = set(params) - {"threshold", "temperature", "steps"}
    if unknown:
        raise ValueError(f"unknown G-Prune parameter(s) {sorted(unknown)}; use threshold, temperature, steps")
    if protected is None:
        keep_always = torch.zeros(n, dtype=torch.bool, device=x.device)
    else:
        keep_always = torch.as_tensor(protected, device=x.device)
        if keep_always.dtype != torch.bool or keep_always.shape != (n,):
            raise ValueError(f"protected must be a bool mask of shape ({n},), got {keep_always.dtype} {tuple(keep_always.shape)}")
    free = ~keep_always
    available = int(free.sum())
    _check_count(k, available)
    scores = torch.full((n,), -math.inf, device=x.device)
    if available:
        scores[free] = gprune_scores(x[free], **params)
    return _topk_mask(scores, k, free) | keep_always


# --- FoPru ---


def fopru_significance(attn: torch.Tensor, has_cls: bool = True) -> torch.Tensor:
    """FoPru token significance from the vision encoder's attention at the feature layer.

    Args:
        attn: (H, T, T) post-softmax attention (query rows, key columns) of the feature layer.
        has_cls: the encoder has a CLS token at position 0 (CLIP): significance is the CLS row's
            attention to each patch, averaged over heads, CLS column dropped (not renormalised:
            the ranking is the same). Without CLS (SigLIP): the mean over heads and query rows of
            the attention each patch receives.

    Returns:
        (P,) float32, ``P = T − 1`` with CLS, else ``T``.

    Raises:
        ValueError: ``attn`` is not (H, T, T).

    Example:
        >>> a = torch.tensor([[[0.1, 0.6, 0.3], [0.2, 0.4, 0.4], [0.3, 0.3, 0.4]]])
        >>> fopru_significance(a).tolist()
        [0.6000000238418579, 0.30000001192092896]
        >>> [round(v, 3) for v in fopru_significance(a, has_cls=False).tolist()]
        [0.2, 0.433, 0.367]
    """
    if not isinstance(attn, torch.Tensor) or attn.ndim != 3 or attn.shape[1] != attn.shape[2]:
        shape = tuple(attn.shape) if isinstance(attn, torch.Tensor) else type(attn).__name__
        raise ValueError(f"attn must be a (heads, T, T) tensor, got {shape}")
    a = attn.detach().float()
    if has_cls:
        if a.shape[1] < 2:
            raise ValueError(f"attn has T={a.shape[1]} tokens; with a CLS token it needs T >= 2")
        return a[:, 0, 1:].mean(dim=0)
    return a.mean(dim=(0, 1))


def _check_significance(significance: torch.Tensor) -> torch.Tensor:
    if not isinstance(significance, torch.Tensor) or significance.ndim != 1:
        shape = tuple(significance.shape) if isinstance(significance, torch.Tensor) else type(significance).__name__
        raise ValueError(f"significance must be a 1-D tensor (patches,), got {shape}")
    return significance


def fopru_rank_keep(significance: torch.Tensor, k: int) -> torch.Tensor:
    """FoPru rank: keep the global top-``k`` by significance.

    Args:
        significance: (P,) from :func:`fopru_significance`.
        k: tokens to keep, in ``[0, P]``.

    Returns:
        (P,) bool mask (original order); ties: earlier first.

    Example:
        >>> fopru_rank_keep(torch.tensor([0.1, 0.5, 0.2, 0.5]), 2).tolist()
        [False, True, False, True]
    """
    s = _check_significance(significance)
    _check_count(k, s.shape[0])
    return _topk_mask(s, k)


def fopru_row_keep(significance: torch.Tensor, grid_hw: tuple[int, int], k: int) -> torch.Tensor:
    """FoPru row: keep whole patch-grid rows, best first, then a partial row filled by rank.

    A row's significance is the **mean** of its tokens' (all rows have the same width, so the sum
    ranks identically). Rows are taken best first (ties: upper row first) while a whole row still
    fits in ``k``; the remaining ``k mod W`` tokens come from the **next** row in that order, its
    most significant tokens (ties: left first). So the result is ``k // W`` whole rows plus at
    most one partial row.

    Args:
        significance: (P,) from :func:`fopru_significance`, row-major over the grid.
        grid_hw: (H, W) with ``H·W = P``.
        k: tokens to keep, in ``[0, P]``.

    Returns:
        (P,) bool mask (original order).

    Raises:
        ValueError: the grid does not match ``P`` or ``k`` is out of range.

    Example:
        >>> s = torch.tensor([0.1, 0.1, 0.9, 0.0, 0.5, 0.6])  # rows (0.1, 0.1), (0.9, 0.0), (0.5, 0.6)
        >>> fopru_row_keep(s, (3, 2), 3).tolist()  # row 2 (mean 0.55) whole, then row 1's best
        [False, False, True, False, True, True]
    """
    s = _check_significance(significance)
    try:
        h, w = (int(v) for v in grid_hw)
    except (TypeError, ValueError):
        raise ValueError(f"grid_hw={grid_hw!r} must be (rows, columns)") from None
    if h < 1 or w < 1 or h * w != s.shape[0]:
        raise ValueError(f"grid_hw={grid_hw!r} has {h * w} cells; it must match the {s.shape[0]} significances")
    _check_count(k, s.shape[0])
    grid = s.detach().float().reshape(h, w)
    row_order = torch.sort(grid.mean(dim=1), descending=True, stable=True).indices
    full, rest = divmod(k, w)
    mask = torch.zeros(h, w, dtype=torch.bool, device=s.device)
    mask[row_order[:full]] = True
    if rest:
        partial = int(row_order[full])
        mask[partial] = _topk_mask(grid[partial], rest)
    return mask.reshape(-1)


# --- CLS inflection ---


def cls_similarity(patch_features: torch.Tensor, cls_feature: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each patch feature to the encoder's CLS feature.

    Args:
        patch_features: (P, D).
        cls_feature: (D,).

    Returns:
        (P,) float32 in [-1, 1] (0 for an all-zero vector).

    Example:
        >>> cls_similarity(torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, -2.0]]), torch.tensor([2.0, 0.0])).tolist()
        [1.0, 0.7071067690849304, 0.0]
    """
    p = _check_matrix(patch_features, "patch_features").detach().float()
    c = cls_feature.detach().float() if isinstance(cls_feature, torch.Tensor) else None
    if c is None or c.shape != (p.shape[1],):
        shape = tuple(cls_feature.shape) if isinstance(cls_feature, torch.Tensor) else type(cls_feature).__name__
        raise ValueError(f"cls_feature must have shape ({p.shape[1]},) to match the patches, got {shape}")
    unit_p = p / p.norm(dim=1, keepdim=True).clamp_min(_EPS)
    unit_c = c / c.norm().clamp_min(_EPS)
    return unit_p @ unit_c


def knee_index(values_sorted_desc: torch.Tensor, detector: str = "kneedle") -> int:
    """The knee of a descending curve: how many head values to keep (up to and including the knee).

    Both axes are normalised to [0, 1]: ``x_i = i / (n − 1)``, ``y_i = (v_i − min) / (max − min)``.

    * ``kneedle``: the point at the largest perpendicular distance from the chord joining the first
      and last points.
    * ``max-curvature``: the interior point of largest signed curvature
      ``κ_i = y''_i / (1 + y'_i²)^{3/2}`` with central differences
      (``y'_i = (y_{i+1} − y_{i−1}) / 2Δx``, ``y''_i = (y_{i+1} − 2y_i + y_{i−1}) / Δx²``): the sharpest
      convex bend. On ``e^{−i/τ}`` it sits where the normalised slope is ``−1/√2`` (Kneedle: ``−1``).

    Ties go to the earliest point. The result is ``knee + 1`` (the head through the knee). A curve
    with no point off the chord (``n <= 2``, constant or straight; for ``max-curvature`` also one
    with no convex bend) has no knee: keep all ``n``.

    Args:
        values_sorted_desc: (n,) non-increasing values, n >= 1.
        detector: one of :data:`DETECTORS`.

    Returns:
        The count to keep, in ``[1, n]``.

    Raises:
        ValueError: not 1-D, empty, non-finite, not non-increasing, or an unknown detector.

    Example:
        >>> knee_index(torch.tensor([10.0, 2.0, 1.6, 1.2, 0.8, 0.4, 0.0]))  # corner at index 1
        2
        >>> knee_index(torch.tensor([10.0, 2.0, 1.6, 1.2, 0.8, 0.4, 0.0]), "max-curvature")
        2
    """
    if detector not in DETECTORS:
        raise ValueError(f"inflection detector {detector!r} is unknown; choose one of {', '.join(DETECTORS)}")
    v = values_sorted_desc
    if not isinstance(v, torch.Tensor) or v.ndim != 1 or v.shape[0] < 1:
        shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise ValueError(f"values_sorted_desc must be a non-empty 1-D tensor, got {shape}")
    y = v.detach().double()
    if not bool(torch.isfinite(y).all()):
        raise ValueError("values_sorted_desc holds NaN or inf; the curve needs finite values")
    if bool((y[1:] > y[:-1]).any()):
        bad = int(torch.nonzero(y[1:] > y[:-1])[0]) + 1
        raise ValueError(f"values_sorted_desc must be non-increasing; value {bad} rises above value {bad - 1}")
    n = y.shape[0]
    span = float(y[0] - y[-1])
    if n <= 2 or span <= 0.0:
        return n
    x = torch.arange(n, dtype=torch.float64) / (n - 1)
    return DETECTORS[detector](x, (y - y[-1]) / span)


def inflection_keep(similarity: torch.Tensor, detector: str = "kneedle") -> torch.Tensor:
    """Keep the most similar tokens, as many as the knee of the sorted similarity curve says.

    Args:
        similarity: (P,) e.g. :func:`cls_similarity`.
        detector: one of :data:`DETECTORS`.

    Returns:
        (P,) bool mask (original order); ties: earlier first.

    Example:
        >>> inflection_keep(torch.tensor([0.1, 0.9, 0.12, 0.95, 0.11, 0.1])).tolist()  # knee: foot of the drop
        [False, True, True, True, False, False]
    """
    s = _check_significance(similarity)
    order = torch.sort(s.detach().float(), descending=True, stable=True)
    return _topk_mask(s, knee_index(order.values, detector))


def cls_inflection_keep(patch_features: torch.Tensor, cls_feature: torch.Tensor, detector: str = "kneedle") -> torch.Tensor:
    """CLS-inflection: keep the patches most similar to CLS, as many as the curve's knee says.

    Sort :func:`cls_similarity` descending (ties: earlier first), keep :func:`knee_index` of them.

    Args:
        patch_features: (P, D).
        cls_feature: (D,).
        detector: one of :data:`DETECTORS` (default Kneedle).

    Returns:
        (P,) bool mask (original order); the count varies per image.

    Example:
        >>> cls = torch.tensor([1.0, 0.0])
        >>> angles = torch.tensor([0.0, 0.1, 1.2, 1.3, 1.4, 1.5])
        >>> cls_inflection_keep(torch.stack([angles.cos(), angles.sin()], 1), cls).tolist()  # knee: foot of the drop
        [True, True, True, False, False, False]
    """
    return inflection_keep(cls_similarity(patch_features, cls_feature), detector)

"""Exact language-model prefill FLOPs of a (pruned) decoder stack, from the model config.

Pure numpy. The per-layer formula (its conventions, :class:`LMShape`, :func:`layer_flops`,
:func:`stack_flops`, :func:`scale_counts`) lives in :mod:`runtime.flops`, re-exported here: the
runtime needs it to hold a strict per-request budget, and there is one source of it. This module
builds the compiler's tables on it: per-layer costs by visual-token count, the scorer's probe per
cut, budget floors, fractions.

Reported beside the budget, never part of it: the vision encoder + projector FLOPs
(:class:`VisionShape`, built per family by ``recipe_compiler.families``; :func:`encoder_flops`) and
the visual-token-only fraction (:func:`visual_token_fraction`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.flops import (  # noqa: F401  (re-exported: one source of the formula)
    LAYER_KINDS,
    LMShape,
    _as_counts,
    _check_v_ref,
    _pairs,
    attention_pairs,
    layer_flops,
    prefill_flops,
    scale_counts,
    stack_flops,
)

__all__ = [
    "LMShape",
    "LAYER_KINDS",
    "layer_flops",
    "stack_flops",
    "attention_pairs",
    "prefill_flops",
    "scale_counts",
    "cost_table",
    "schedule_flops_fraction",
    "min_feasible_budget",
    "visual_token_equivalent",
    "VisionShape",
    "encoder_flops",
    "reference_encoder_flops",
    "visual_token_fraction",
    "format_flops",
    "probe_flops",
    "probe_table",
    "cut_flops",
]


def _check_samples(n_other: Any, n_visual: Any) -> tuple[np.ndarray, np.ndarray]:
    other = _as_counts(n_other, "n_other").reshape(-1)
    visual = _as_counts(n_visual, "n_visual").reshape(-1)
    if other.shape != visual.shape or other.size == 0:
        raise ValueError(
            f"n_other {other.shape} and n_visual {visual.shape} must be non-empty and hold one count per sample"
        )
    return other, visual


def cost_table(shape: LMShape, n_other: Any, n_visual: Any, v_ref: int) -> np.ndarray:
    """Mean FLOPs of each layer as a function of the reference visual-token count entering it.

    Args:
        shape: the model sizes.
        n_other: int ``[S]``, non-visual prompt tokens of each sample (system + text).
        n_visual: int ``[S]``, visual tokens of each sample.
        v_ref: reference visual-token count the schedule is expressed in.

    Returns:
        float64 ``[num_layers, v_ref + 1]``: entry ``[l, k]`` is the mean over samples of
        the layer's FLOPs on ``n_other[s] + scale_counts(k, n_visual[s], v_ref)`` tokens. Rows of
        layers of one kind are the same; a linear-attention layer's row is linear in ``k``.

    Example:
        >>> s = LMShape(num_layers=2, hidden=2, intermediate=3, num_heads=1, num_kv_heads=1, head_dim=2)
        >>> cost_table(s, [1], [2], v_ref=2).tolist()
        [[76.0, 160.0, 252.0], [76.0, 160.0, 252.0]]
    """
    v_ref = _check_v_ref(v_ref)
    other, visual = _check_samples(n_other, n_visual)
    ks = scale_counts(np.arange(v_ref + 1)[None, :], visual[:, None], v_ref)  # [S, v_ref+1]
    n = (other[:, None] + ks).astype(np.float64)
    projections, pair, window = shape.layer_terms()
    if shape.quadratic:
        a, b = shape.layer_coefficients()
        return a[:, None] * np.mean(n, axis=0)[None, :] + b[:, None] * np.mean(n * n, axis=0)[None, :]
    table = np.empty((shape.num_layers, v_ref + 1), dtype=np.float64)
    mean_pairs = {}  # one row per window size: layers of one kind share it
    for layer in range(shape.num_layers):
        w = float(window[layer])
        if w not in mean_pairs:
            pairs = _pairs(n, w)
            if shape.bidirectional_visual:
                pairs = pairs + ks * np.maximum(ks - 1.0, 0.0) / 2.0
            mean_pairs[w] = np.mean(pairs, axis=0)
        table[layer] = projections[layer] * np.mean(n, axis=0) + pair[layer] * mean_pairs[w]
    return table


def _check_keep(keep_counts: Any, shape: LMShape, v_ref: int) -> np.ndarray:
    keep = _as_counts(keep_counts, "keep_counts")
    if keep.shape != (shape.num_layers,):
        raise ValueError(f"keep_counts has shape {keep.shape}; it needs one count per layer ({shape.num_layers},)")
    if np.any(keep > v_ref):
        raise ValueError(f"keep_counts exceed v_ref={v_ref} (max {keep.max()}); counts are for the reference count")
    return keep


def _schedule_mean_flops(shape: LMShape, other: np.ndarray, visual: np.ndarray, keep: np.ndarray, v_ref: int) -> float:
    ks = scale_counts(keep[None, :], visual[:, None], v_ref)  # [S, L]
    per_sample = np.sum(stack_flops(shape, other[:, None] + ks, ks), axis=1)
    return float(np.mean(per_sample))


def schedule_flops_fraction(
    shape: LMShape, n_other: Any, n_visual: Any, keep_counts: Any, v_ref: int
) -> float:
    """Fraction of the unpruned prefill FLOPs a schedule spends (the budget semantics).

    Args:
        shape: the model sizes.
        n_other: int ``[S]``, non-visual prompt tokens per sample.
        n_visual: int ``[S]``, visual tokens per sample.
        keep_counts: int ``[num_layers]``, visual tokens (reference count) alive entering each layer.
        v_ref: reference visual-token count.

    Returns:
        ``mean_s(pruned FLOPs) / mean_s(unpruned FLOPs)`` (a ratio of means).

    Example:
        >>> s = LMShape(num_layers=2, hidden=2, intermediate=3, num_heads=1, num_kv_heads=1, head_dim=2)
        >>> schedule_flops_fraction(s, [1], [2], [2, 2], v_ref=2)
        1.0
    """
    v_ref = _check_v_ref(v_ref)
    other, visual = _check_samples(n_other, n_visual)
    keep = _check_keep(keep_counts, shape, v_ref)
    full = np.full(shape.num_layers, v_ref, dtype=np.int64)
    return _schedule_mean_flops(shape, other, visual, keep, v_ref) / _schedule_mean_flops(
        shape, other, visual, full, v_ref
    )


def _probe_layout(other: np.ndarray, n_before: Any, n_text: Any) -> tuple[np.ndarray, np.ndarray]:
    """Tokens before and after the image per sample; without them, all non-visual tokens follow it."""
    before = np.zeros_like(other) if n_before is None else _as_counts(n_before, "n_before").reshape(-1)
    text = other - before if n_text is None else _as_counts(n_text, "n_text").reshape(-1)
    if before.shape != other.shape or text.shape != other.shape or np.any(before + text > other):
        raise ValueError(f"n_before and n_text need one count per sample ({other.size}) with n_before + n_text <= n_other")
    return before, text


def probe_table(shape: LMShape, n_other: Any, n_visual: Any, v_ref: int, probe_macs: Any,
                n_before: Any = None, n_text: Any = None) -> np.ndarray:
    """Mean FLOPs of a scorer's probe on entry to each layer, by the visual tokens alive before the cut.

    A cut on entry to layer ``l`` (``k_l < k_{l−1}``) runs the scorer's probe on the row as it
    enters layer ``l − 1``: ``n_other + scale(k_{l−1})`` real tokens, ``scale(k_{l−1})`` of them
    visual. Its cost is a transition cost of the schedule: it depends on the count *before* the
    cut and is paid only where the count falls.

    Args:
        shape: the model sizes.
        n_other, n_visual: int ``[S]``, as for :func:`cost_table`.
        v_ref: reference visual-token count.
        probe_macs: ``probe_macs(shape, n_tokens, n_visual, n_before, n_text) -> multiply-adds``
            (vectorised), a scorer's :meth:`~runtime.methods.scorers.base.Scorer.probe_macs`.
        n_before: int ``[S]``, real tokens before the image (default 0).
        n_text: int ``[S]``, real tokens after the image (default ``n_other − n_before``).

    Returns:
        float64 ``[num_layers, v_ref + 1]``: entry ``[l, x]`` is the mean over samples of the
        probe's FLOPs (2 per multiply-add) for a cut into ``l`` from ``x`` reference tokens; row 0
        is 0 (nothing is cut on entry to layer 0 inside the language model).

    Example:
        >>> s = LMShape(num_layers=2, hidden=2, intermediate=3, num_heads=1, num_kv_heads=1, head_dim=2)
        >>> probe_table(s, [1], [2], 2, lambda shape, n, v, b, t: n * 10.0).tolist()
        [[0.0, 0.0, 0.0], [20.0, 40.0, 60.0]]
    """
    v_ref = _check_v_ref(v_ref)
    other, visual = _check_samples(n_other, n_visual)
    before, text = _probe_layout(other, n_before, n_text)
    ks = scale_counts(np.arange(v_ref + 1)[None, :], visual[:, None], v_ref).astype(np.float64)  # [S, v_ref+1]
    macs = np.asarray(probe_macs(shape, other[:, None] + ks, ks, before[:, None].astype(np.float64),
                                 text[:, None].astype(np.float64)), dtype=np.float64)
    row = 2.0 * np.mean(np.broadcast_to(macs, ks.shape), axis=0)
    table = np.tile(row, (shape.num_layers, 1))
    table[0] = 0.0
    return table


def cut_flops(probes: Any, keep_counts: Any) -> np.ndarray | float:
    """The probe FLOPs a schedule pays: ``Σ_{l: k_l < k_{l−1}} probes[l, k_{l−1}]``.

    Args:
        probes: float ``[L, V + 1]`` (:func:`probe_table`).
        keep_counts: int ``[L]`` or ``[n, L]`` schedules.

    Returns:
        float (float64 ``[n]`` for several schedules).

    Example:
        >>> cut_flops([[0.0, 0.0, 0.0], [20.0, 40.0, 60.0]], [2, 1])
        60.0
    """
    p = np.asarray(probes, dtype=np.float64)
    k = np.asarray(keep_counts, dtype=np.int64)
    single = k.ndim == 1
    k = np.atleast_2d(k)
    layers = np.arange(1, k.shape[1])
    cut = k[:, 1:] < k[:, :-1]
    out = np.sum(np.where(cut, p[layers[None, :], k[:, :-1]], 0.0), axis=1)
    return float(out[0]) if single else out


def probe_flops(shape: LMShape, n_other: Any, n_visual: Any, keep_counts: Any, v_ref: int, probe_macs: Any,
                n_before: Any = None, n_text: Any = None) -> float:
    """Mean FLOPs over samples that a scorer's probes add to a schedule.

    At each pruning layer ``l`` (``keep[l] < keep[l − 1]``) the scorer sees the row's tokens before
    the cut: ``n_other + scale(keep[l − 1])`` real tokens, of which ``scale(keep[l − 1])`` visual
    (:func:`probe_table`, :func:`cut_flops`).

    Args:
        probe_macs: ``probe_macs(shape, n_tokens, n_visual, n_before, n_text) -> multiply-adds``
            (vectorised over numpy arrays), a scorer's :meth:`~runtime.methods.scorers.base.Scorer.probe_macs`.
        n_before, n_text: as for :func:`probe_table`.

    Example:
        >>> s = LMShape(num_layers=2, hidden=2, intermediate=3, num_heads=1, num_kv_heads=1, head_dim=2)
        >>> probe_flops(s, [1], [2], [2, 1], 2, lambda shape, n, v, b, t: n * 10.0)   # one cut, 3 tokens before it
        60.0
    """
    keep = _check_keep(keep_counts, shape, _check_v_ref(v_ref))
    return cut_flops(probe_table(shape, n_other, n_visual, v_ref, probe_macs, n_before, n_text), keep)


def min_feasible_budget(shape: LMShape, n_other: Any, n_visual: Any, v_ref: int, first_cut: int = 1,
                        probes: Any = None) -> float:
    """The smallest budget any schedule can meet: all visual tokens up to the first layer a cut may
    enter, none afterwards.

    Args:
        shape: the model sizes.
        n_other: int ``[S]``, non-visual prompt tokens per sample.
        n_visual: int ``[S]``, visual tokens per sample.
        v_ref: reference visual-token count.
        first_cut: the first layer a cut may enter (1; later where layer 0 has no attention rows to
            score by, e.g. Qwen3.5's linear attention).
        probes: the scorer's :func:`probe_table` (its one cut's probe is counted); None: no probe.

    Returns:
        The FLOPs fraction of the schedule ``[v_ref, 0, 0, …]``.

    Example:
        >>> s = LMShape(num_layers=2, hidden=2, intermediate=3, num_heads=1, num_kv_heads=1, head_dim=2)
        >>> round(min_feasible_budget(s, [1], [2], v_ref=2), 6)  # (252 + 76) / (2·252)
        0.650794
    """
    v_ref = _check_v_ref(v_ref)
    keep = np.zeros(shape.num_layers, dtype=np.int64)
    keep[:max(1, int(first_cut))] = v_ref
    fraction = schedule_flops_fraction(shape, n_other, n_visual, keep, v_ref)
    if probes is None:
        return fraction
    other, visual = _check_samples(n_other, n_visual)
    full = np.full(shape.num_layers, v_ref, dtype=np.int64)
    return fraction + cut_flops(probes, keep) / _schedule_mean_flops(shape, other, visual, full, v_ref)


def visual_token_equivalent(
    shape: LMShape, n_other: Any, n_visual: Any, keep_counts: Any, v_ref: int, n_survivors: Any = None
) -> float:
    """The constant visual-token count with the same mean FLOPs as a schedule.

    The figure FastV / VisionZip tables quote ("64 tokens"). A constant count ``c`` (reference
    count, real-valued) means sample ``s`` runs ``c·n_visual[s]/v_ref`` visual tokens (unrounded)
    at every layer; ``c`` is the root of the quadratic ``mean_s Σ_l layer_flops = target``, solved
    in closed form. When every sample has ``v_ref`` visual tokens, a constant schedule ``k`` gives
    back exactly ``k``; with mixed counts, the per-sample rounding of the schedule makes it differ
    by a fraction of a token.

    Args:
        shape: the model sizes.
        n_other: int ``[S]``, non-visual prompt tokens per sample.
        n_visual: int ``[S]``, visual tokens per sample.
        keep_counts: int ``[num_layers]``, visual tokens (reference count) alive entering each layer.
        v_ref: reference visual-token count.
        n_survivors: int ``[S]``, visual tokens left by a pre-LLM stage (the schedule then scales
            with them); ``c`` stays relative to ``n_visual``.

    Returns:
        ``c`` in ``[0, v_ref]``.

    Example:
        >>> s = LMShape(num_layers=2, hidden=2, intermediate=3, num_heads=1, num_kv_heads=1, head_dim=2)
        >>> round(visual_token_equivalent(s, [1, 3], [4, 4], [4, 0], v_ref=4), 6)
        2.152946
    """
    v_ref = _check_v_ref(v_ref)
    other, visual = _check_samples(n_other, n_visual)
    keep = _check_keep(keep_counts, shape, v_ref)
    scaled = visual if n_survivors is None else _check_samples(n_other, n_survivors)[1]
    target = _schedule_mean_flops(shape, other, scaled, keep, v_ref)
    if not shape.quadratic:
        return _constant_count(shape, other, visual, v_ref, target)
    layer_a, layer_b = shape.layer_coefficients()
    a, b = float(np.sum(layer_a)), float(np.sum(layer_b))  # a constant count: the stack's coefficients add up
    o = other.astype(np.float64)
    r = visual.astype(np.float64) / v_ref
    # mean_s [a(o + c r) + b(o + c r)²] = target  →  A c² + B c + C = 0, with C <= 0, B >= 0
    A = b * float(np.mean(r * r))
    B = a * float(np.mean(r)) + 2.0 * b * float(np.mean(o * r))
    C = float(np.mean(a * o + b * o * o)) - target
    if C >= 0.0 or (A == 0.0 and B == 0.0):
        return 0.0
    disc = max(B * B - 4.0 * A * C, 0.0)
    c = (-2.0 * C) / (B + np.sqrt(disc))  # the positive root, without cancellation
    return float(min(max(c, 0.0), float(v_ref)))


def _constant_count(shape: LMShape, other: np.ndarray, visual: np.ndarray, v_ref: int, target: float) -> float:
    """:func:`visual_token_equivalent` where the stack is not quadratic: the mean FLOPs of a
    constant count are increasing in it, so bisection finds the count that spends ``target``."""
    o = other.astype(np.float64)[:, None]
    r = visual.astype(np.float64)[:, None] / v_ref

    def spent(c: float) -> float:
        k = np.repeat(c * r, shape.num_layers, axis=1)
        return float(np.mean(np.sum(stack_flops(shape, o + k, k), axis=1)))

    low, high = 0.0, float(v_ref)
    if spent(low) >= target:
        return 0.0
    if spent(high) <= target:
        return high
    for _ in range(100):  # to float resolution of [0, v_ref]
        middle = 0.5 * (low + high)
        if middle in (low, high):
            break
        low, high = (middle, high) if spent(middle) < target else (low, middle)
    return low


# --------------------------------------------------------------------------------------------
# Vision encoder (+ projector): reported beside the LM figures, never part of the budget.
# --------------------------------------------------------------------------------------------
VISION_KINDS = ("crops", "grids")


@dataclass(frozen=True)
class VisionShape:
    """The sizes of a vision encoder and its projector that their FLOPs depend on.

    Conventions as for the language model (2 FLOPs per multiply-add; norms, activations, position
    embeddings, softmax and residuals ignored). Per encoder layer and sequence of ``n`` tokens:
    q/k/v/o projections ``4·n·w²``, bidirectional attention scores and values ``2·n²·w``, MLP
    ``2·n·w·m`` (``3·n·w·m`` when gated). The patch embedding costs ``patch_inputs·w`` per patch,
    the projector ``Σ in·out`` per token it maps.

    Attributes:
        kind: ``"crops"`` (a ViT run once per square crop on ``patches + 1`` tokens, CLS included;
            the projector maps ``projected_per_crop`` of them: CLIP in LLaVA, LLaVA-NeXT) or
            ``"grids"`` (a ViT over an image's ``t·h·w`` patches, attention within each frame, or
            within windows of ``window × window`` merged tokens outside ``full_attention_layers``;
            the merger maps every ``merge²`` patches to one token: Qwen2-VL, Qwen2.5-VL).
        layers: encoder layers (all of them run, whatever feature layer is used).
        width: encoder width ``w``.
        intermediate: encoder MLP width ``m``.
        gated_mlp: a gate/up/down MLP (Qwen2.5-VL) instead of fc1/fc2.
        patch_inputs: pixel values per patch (channels · patch² · temporal patch).
        projector: ``((in, out), …)``, the linear layers of the projector / merger MLP.
        tokens_per_crop: ``"crops"``: encoder tokens per crop (patches + CLS); 0 otherwise.
        projected_per_crop: ``"crops"``: tokens the projector maps per crop.
        merge: spatial merge size (1 for ``"crops"``).
        window: window side in merged tokens (0: every layer attends to the whole frame).
        full_attention_layers: with windows, the layers that attend to the whole frame.
        reference_crops: ``"crops"``: crops of the family's reference image (1 for LLaVA-1.5,
            base + grid crops of the largest pinpoint for LLaVA-NeXT).
        cls_tokens: ``"crops"``: encoder tokens per crop that are not patches (1: CLIP's CLS; 0: SigLIP).

    Example:
        >>> s = VisionShape("crops", 1, 2, 4, False, 3, ((2, 3),), tokens_per_crop=2, projected_per_crop=1)
        >>> encoder_flops(s, crops=1)  # 2·[patch 1·3·2 + 2 tokens·(4·2² + 2·2·4) + 2·2·2² + 1·2·3]
        184.0
    """

    kind: str
    layers: int
    width: int
    intermediate: int
    gated_mlp: bool
    patch_inputs: int
    projector: tuple
    tokens_per_crop: int = 0
    projected_per_crop: int = 0
    merge: int = 1
    window: int = 0
    full_attention_layers: tuple = ()
    reference_crops: int = 1
    cls_tokens: int = 1

    def __post_init__(self) -> None:
        if self.kind not in VISION_KINDS:
            raise ValueError(f"VisionShape.kind={self.kind!r} is unknown; choose one of {', '.join(VISION_KINDS)}")
        for name in ("layers", "width", "intermediate", "patch_inputs", "merge", "reference_crops"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"VisionShape.{name}={value!r} is invalid; it must be a positive integer")
        if self.kind == "crops" and not 1 <= self.projected_per_crop <= self.tokens_per_crop:
            raise ValueError("a crops VisionShape needs 1 <= projected_per_crop <= tokens_per_crop")
        object.__setattr__(self, "projector", tuple((int(a), int(b)) for a, b in self.projector))
        object.__setattr__(self, "full_attention_layers", tuple(int(i) for i in self.full_attention_layers))


def _encoder_layer_macs(shape: VisionShape, sequences: Any) -> float:
    """Multiply-adds of one encoder layer over independent attention sequences of these lengths."""
    n = np.asarray(sequences, dtype=np.float64).reshape(-1)
    w, m = float(shape.width), float(shape.intermediate)
    mlp = (3.0 if shape.gated_mlp else 2.0) * w * m
    return float(np.sum(n) * (4.0 * w * w + mlp) + 2.0 * w * np.sum(n * n))


def _window_sides(n: int, k: int) -> list[int]:
    return [k] * (n // k) + ([n % k] if n % k else [])


def _grid_macs(shape: VisionShape, t: int, h: int, w: int) -> float:
    """Multiply-adds of a ``"grids"`` ViT and merger on one image / video of ``t×h×w`` patches."""
    patches = t * h * w
    frame = h * w
    macs = patches * shape.patch_inputs * shape.width
    full = _encoder_layer_macs(shape, [frame] * t)
    if shape.window:
        unit = shape.merge * shape.merge
        rows = _window_sides(h // shape.merge, shape.window)
        cols = _window_sides(w // shape.merge, shape.window)
        windows = [r * c * unit for r in rows for c in cols] * t
        windowed = _encoder_layer_macs(shape, windows)
        n_full = sum(1 for i in shape.full_attention_layers if 0 <= i < shape.layers)
        macs += n_full * full + (shape.layers - n_full) * windowed
    else:
        macs += shape.layers * full
    tokens = patches // (shape.merge * shape.merge)
    return macs + tokens * sum(a * b for a, b in shape.projector)


def encoder_flops(shape: VisionShape, crops: int = 0, grids: Any = ()) -> float:
    """FLOPs of the vision encoder and projector for one prompt's images.

    Args:
        shape: the encoder's sizes.
        crops: ``"crops"``: how many crops the encoder runs (one per LLaVA-1.5 image; base + grid
            crops per LLaVA-NeXT image).
        grids: ``"grids"``: ``(t, h, w)`` in patches per image (``image_grid_thw``).

    Returns:
        float FLOPs (0.0 for no images).

    Example:
        >>> s = VisionShape("crops", 1, 2, 4, False, 3, ((2, 3),), tokens_per_crop=2, projected_per_crop=1)
        >>> encoder_flops(s, crops=3) == 3 * encoder_flops(s, crops=1)
        True
    """
    if shape.kind == "crops":
        crops = int(crops)
        if crops < 0:
            raise ValueError(f"crops must be non-negative, got {crops}")
        n = shape.tokens_per_crop
        per_crop = (
            (n - shape.cls_tokens) * shape.patch_inputs * shape.width
            + shape.layers * _encoder_layer_macs(shape, [n])
            + shape.projected_per_crop * sum(a * b for a, b in shape.projector)
        )
        return 2.0 * crops * per_crop
    total = 0.0
    for grid in np.asarray(grids, dtype=np.int64).reshape(-1, 3).tolist():
        t, h, w = grid
        if t < 1 or h < shape.merge or w < shape.merge or h % shape.merge or w % shape.merge:
            raise ValueError(f"image grid {grid} is invalid: t >= 1 and h, w multiples of the merge size {shape.merge}")
        total += 2.0 * _grid_macs(shape, t, h, w)
    return total


def reference_encoder_flops(shape: VisionShape, v_ref: int) -> float:
    """Vision FLOPs of the family's reference image (the recipe's unit of ``v_ref`` tokens).

    Args:
        shape: the encoder's sizes.
        v_ref: the recipe's reference visual-token count (``"grids"``: a square grid of ``v_ref``
            merged tokens, one frame).

    Returns:
        float FLOPs.

    Example:
        >>> s = VisionShape("crops", 1, 2, 4, False, 3, ((2, 3),), tokens_per_crop=2, projected_per_crop=1)
        >>> reference_encoder_flops(s, 1)
        184.0
    """
    v_ref = _check_v_ref(v_ref)
    if shape.kind == "crops":
        return encoder_flops(shape, crops=shape.reference_crops)
    side = int(np.sqrt(v_ref))
    if side * side != v_ref:
        raise ValueError(f"v_ref={v_ref} is not a square grid of merged tokens")
    return encoder_flops(shape, grids=[(1, side * shape.merge, side * shape.merge)])


def visual_token_fraction(shape: LMShape, visual_per_layer: Any, n_visual: Any) -> float:
    """The visual-token-only FLOPs fraction: what the visual tokens alone cost, pruned / unpruned.

    The figure FitPrune-style papers quote: only the visual tokens' own work is counted, as if
    the prompt held nothing else (their projections and MLP, and attention among themselves), so
    the text's share does not dilute it. Ratio of the means over samples.

    Args:
        shape: the language model's sizes.
        visual_per_layer: int ``[S, num_layers]``, visual tokens that entered each layer.
        n_visual: int ``[S]``, visual tokens each sample had before any pruning.

    Returns:
        ``mean_s Σ_l layer_flops(visual[s, l]) / mean_s num_layers·layer_flops(n_visual[s])``
        (1.0 when no sample has visual tokens).

    Example:
        >>> s = LMShape(num_layers=2, hidden=2, intermediate=3, num_heads=1, num_kv_heads=1, head_dim=2)
        >>> round(visual_token_fraction(s, [[2, 0]], [2]), 6)  # 160 / (2·160)
        0.5
    """
    visual = _as_counts(visual_per_layer, "visual_per_layer")
    full = _as_counts(n_visual, "n_visual").reshape(-1)
    if visual.ndim != 2 or visual.shape != (full.size, shape.num_layers):
        raise ValueError(f"visual_per_layer has shape {visual.shape}; it needs [samples, num_layers] = [{full.size}, {shape.num_layers}]")
    if np.any(visual > full[:, None]):
        raise ValueError("visual_per_layer exceeds n_visual: counts after pruning cannot grow")
    everything = np.repeat(full[:, None], shape.num_layers, axis=1)
    unpruned = float(np.mean(np.sum(stack_flops(shape, everything, everything), axis=1)))
    if unpruned == 0.0:
        return 1.0
    return float(np.mean(np.sum(stack_flops(shape, visual, visual), axis=1))) / unpruned


def format_flops(value: float) -> str:
    """``381.9 GFLOPs``-style text with an SI prefix (3–4 significant digits).

    Example:
        >>> format_flops(3.8192e11), format_flops(2.5e6)
        ('381.9 GFLOPs', '2.50 MFLOPs')
    """
    value = float(value)
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            scaled = value / factor
            return f"{scaled:.{1 if abs(scaled) >= 100 else 2}f} {prefix}FLOPs"
    return f"{value:.0f} FLOPs"

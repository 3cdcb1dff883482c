"""Exact language-model prefill FLOPs of a (pruned) decoder stack, from the model config.

Pure numpy. Conventions (DESIGN.md §4):

* 2 FLOPs per multiply-add.
* Per decoder layer and token: q projection ``d·(h·hd)``, k and v projections ``d·(kv·hd)`` each
  (grouped-query attention), o projection ``(h·hd)·d``, gated MLP ``3·d·m`` multiply-adds.
* Causal attention: query ``i`` (0-based) attends to ``i + 1`` keys, so the scores ``QKᵀ`` and the
  weighted values ``AV`` each cost ``h·hd·n(n+1)/2`` multiply-adds for ``n`` tokens.
* RMSNorms, activations, RoPE, softmax, residual adds, embeddings and the LM head are ignored: they
  are linear in ``n`` and well under 1 % of a 7B layer.

Visual-token counts in schedules are given for a reference count ``v_ref`` (the recipe is a ratio);
a sample with ``n_visual`` visual tokens keeps ``round_half_up(k · n_visual / v_ref)`` of them
(:func:`scale_counts`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "LMShape",
    "layer_flops",
    "prefill_flops",
    "scale_counts",
    "cost_table",
    "schedule_flops_fraction",
    "min_feasible_budget",
    "visual_token_equivalent",
]


@dataclass(frozen=True)
class LMShape:
    """The sizes of a decoder-only language model that its prefill FLOPs depend on.

    Attributes:
        num_layers: decoder layers.
        hidden: model width ``d``.
        intermediate: MLP width ``m`` (gated MLP: gate, up and down projections).
        num_heads: query heads ``h``.
        num_kv_heads: key/value heads ``kv`` (``== num_heads`` without GQA).
        head_dim: per-head width ``hd`` (usually ``hidden // num_heads``).

    Example:
        >>> LMShape(32, 4096, 11008, 32, 32, 128).num_layers
        32
    """

    num_layers: int
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden", "intermediate", "num_heads", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"LMShape.{name}={value!r} is invalid; it must be a positive integer")
            object.__setattr__(self, name, int(value))

    @classmethod
    def from_config(cls, text_config: Any) -> "LMShape":
        """Read the shape from a Hugging Face text config (duck-typed).

        Args:
            text_config: an object with ``num_hidden_layers``, ``hidden_size``,
                ``intermediate_size``, ``num_attention_heads`` and optionally
                ``num_key_value_heads`` (default: the head count) and ``head_dim`` (default:
                ``hidden_size // num_attention_heads``). A multimodal config that only carries a
                ``text_config`` attribute is unwrapped.

        Returns:
            The :class:`LMShape`.

        Example:
            >>> from types import SimpleNamespace
            >>> cfg = SimpleNamespace(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
            ...                       num_attention_heads=4, num_key_value_heads=2)
            >>> LMShape.from_config(cfg)
            LMShape(num_layers=2, hidden=64, intermediate=128, num_heads=4, num_kv_heads=2, head_dim=16)
        """
        if getattr(text_config, "num_hidden_layers", None) is None and getattr(text_config, "text_config", None) is not None:
            text_config = text_config.text_config
        missing = [
            name
            for name in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads")
            if getattr(text_config, name, None) is None
        ]
        if missing:
            raise ValueError(
                f"text config lacks {', '.join(missing)}; pass the language model's config (config.text_config)"
            )
        heads = int(text_config.num_attention_heads)
        kv = getattr(text_config, "num_key_value_heads", None)
        head_dim = getattr(text_config, "head_dim", None)
        hidden = int(text_config.hidden_size)
        return cls(
            num_layers=int(text_config.num_hidden_layers),
            hidden=hidden,
            intermediate=int(text_config.intermediate_size),
            num_heads=heads,
            num_kv_heads=int(kv) if kv is not None else heads,
            head_dim=int(head_dim) if head_dim is not None else hidden // heads,
        )

    @property
    def projection_macs_per_token(self) -> int:
        """Multiply-adds per token of the q/k/v/o projections and the gated MLP of one layer."""
        d, qd, kvd = self.hidden, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return d * qd + 2 * d * kvd + qd * d + 3 * d * self.intermediate

    def _coefficients(self) -> tuple[float, float]:
        """``(a, b)`` with ``layer_flops(n) = a·n + b·n²`` (FLOPs, float64)."""
        qd = self.num_heads * self.head_dim
        # 2 FLOPs/MAC × (projections·n + 2 matmuls × qd·n(n+1)/2)
        return 2.0 * (self.projection_macs_per_token + qd), 2.0 * qd


def _as_counts(values: Any, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.dtype.kind == "b" or arr.dtype.kind not in "iuf":
        raise ValueError(f"{name} must be numeric token counts, got dtype {arr.dtype}")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise ValueError(f"{name} must hold whole token counts, got {arr!r}")
    if np.any(arr < 0):
        raise ValueError(f"{name} must be non-negative, got minimum {arr.min()}")
    return arr.astype(np.int64)


def layer_flops(shape: LMShape, n_tokens: Any) -> np.ndarray | float:
    """Exact prefill FLOPs of one decoder layer processing ``n_tokens`` tokens.

    Args:
        shape: the model sizes.
        n_tokens: token count(s); a scalar or any array (vectorised), non-negative.

    Returns:
        float64 FLOPs with the shape of ``n_tokens`` (a Python float for a scalar):
        ``2·[n·(d·h·hd + 2·d·kv·hd + h·hd·d + 3·d·m) + h·hd·n(n+1)]``.

    Example:
        >>> s = LMShape(num_layers=1, hidden=2, intermediate=3, num_heads=1, num_kv_heads=1, head_dim=2)
        >>> layer_flops(s, 1)  # 2·[1·(4 + 8 + 4 + 18) + 2·1·2]
        76.0
    """
    n = np.asarray(n_tokens)
    if n.dtype.kind == "b" or n.dtype.kind not in "iuf" or np.any(n < 0) or not np.all(np.isfinite(n)):
        raise ValueError(f"n_tokens must be non-negative finite numbers, got {n_tokens!r}")
    n = n.astype(np.float64)
    a, b = shape._coefficients()
    out = a * n + b * n * n
    return float(out) if out.ndim == 0 else out


def prefill_flops(shape: LMShape, tokens_entering_each_layer: Any) -> float:
    """Prefill FLOPs of the whole decoder stack for one prompt.

    Args:
        shape: the model sizes.
        tokens_entering_each_layer: int ``[num_layers]``, tokens processed by each layer.

    Returns:
        The sum over layers of :func:`layer_flops` (float).

    Example:
        >>> s = LMShape(num_layers=2, hidden=2, intermediate=3, num_heads=1, num_kv_heads=1, head_dim=2)
        >>> prefill_flops(s, [1, 1])
        152.0
    """
    tokens = np.asarray(tokens_entering_each_layer)
    if tokens.shape != (shape.num_layers,):
        raise ValueError(
            f"tokens_entering_each_layer has shape {tokens.shape}; it needs one count per layer ({shape.num_layers},)"
        )
    return float(np.sum(layer_flops(shape, tokens)))


def scale_counts(k: Any, n_visual: Any, v_ref: int) -> np.ndarray:
    """Visual tokens a sample keeps for a reference count ``k``: ``round_half_up(k·n_visual/v_ref)``.

    Integer arithmetic, so it is exact: ``(2·k·n + v_ref) // (2·v_ref)``.

    Args:
        k: reference counts (scalar or array) in ``[0, v_ref]``.
        n_visual: the samples' visual-token counts (scalar or array); broadcast against ``k``.
        v_ref: the reference visual-token count (>= 1).

    Returns:
        int64 array of the broadcast shape.

    Example:
        >>> scale_counts([0, 1, 2, 3, 4], 6, 4).tolist()  # 1.5 rounds up to 2, 4.5 to 5
        [0, 2, 3, 5, 6]
    """
    v_ref = _check_v_ref(v_ref)
    k = np.asarray(k, dtype=np.int64)
    n = np.asarray(n_visual, dtype=np.int64)
    return (2 * k * n + v_ref) // (2 * v_ref)


def _check_v_ref(v_ref: Any) -> int:
    if isinstance(v_ref, bool) or not isinstance(v_ref, (int, np.integer)) or v_ref < 1:
        raise ValueError(f"v_ref={v_ref!r} is invalid; it must be a positive integer (the reference visual-token count)")
    return int(v_ref)


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
        ``layer_flops(n_other[s] + scale_counts(k, n_visual[s], v_ref))``. Every row is the same
        (a layer's cost does not depend on its index); the table keeps one row per layer so that
        searches can index it like a divergence table.

    Example:
        >>> s = LMShape(num_layers=2, hidden=2, intermediate=3, num_heads=1, num_kv_heads=1, head_dim=2)
        >>> cost_table(s, [1], [2], v_ref=2).tolist()
        [[76.0, 160.0, 252.0], [76.0, 160.0, 252.0]]
    """
    v_ref = _check_v_ref(v_ref)
    other, visual = _check_samples(n_other, n_visual)
    ks = scale_counts(np.arange(v_ref + 1)[None, :], visual[:, None], v_ref)  # [S, v_ref+1]
    row = np.mean(layer_flops(shape, other[:, None] + ks), axis=0)
    return np.tile(row, (shape.num_layers, 1))


def _check_keep(keep_counts: Any, shape: LMShape, v_ref: int) -> np.ndarray:
    keep = _as_counts(keep_counts, "keep_counts")
    if keep.shape != (shape.num_layers,):
        raise ValueError(f"keep_counts has shape {keep.shape}; it needs one count per layer ({shape.num_layers},)")
    if np.any(keep > v_ref):
        raise ValueError(f"keep_counts exceed v_ref={v_ref} (max {keep.max()}); counts are for the reference count")
    return keep


def _schedule_mean_flops(shape: LMShape, other: np.ndarray, visual: np.ndarray, keep: np.ndarray, v_ref: int) -> float:
    ks = scale_counts(keep[None, :], visual[:, None], v_ref)  # [S, L]
    per_sample = np.sum(layer_flops(shape, other[:, None] + ks), axis=1)
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


def min_feasible_budget(shape: LMShape, n_other: Any, n_visual: Any, v_ref: int) -> float:
    """The smallest budget any schedule can meet: all visual tokens in layer 0, none afterwards.

    Args:
        shape: the model sizes.
        n_other: int ``[S]``, non-visual prompt tokens per sample.
        n_visual: int ``[S]``, visual tokens per sample.
        v_ref: reference visual-token count.

    Returns:
        The FLOPs fraction of the schedule ``[v_ref, 0, 0, …]``.

    Example:
        >>> s = LMShape(num_layers=2, hidden=2, intermediate=3, num_heads=1, num_kv_heads=1, head_dim=2)
        >>> round(min_feasible_budget(s, [1], [2], v_ref=2), 6)  # (252 + 76) / (2·252)
        0.650794
    """
    v_ref = _check_v_ref(v_ref)
    keep = np.zeros(shape.num_layers, dtype=np.int64)
    keep[0] = v_ref
    return schedule_flops_fraction(shape, n_other, n_visual, keep, v_ref)


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
    a, b = shape._coefficients()
    L = float(shape.num_layers)
    o = other.astype(np.float64)
    r = visual.astype(np.float64) / v_ref
    # mean_s L·[a(o + c r) + b(o + c r)²] = target  →  A c² + B c + C = 0, with C <= 0, B >= 0
    A = L * b * float(np.mean(r * r))
    B = L * (a * float(np.mean(r)) + 2.0 * b * float(np.mean(o * r)))
    C = L * float(np.mean(a * o + b * o * o)) - target
    if C >= 0.0 or (A == 0.0 and B == 0.0):
        return 0.0
    disc = max(B * B - 4.0 * A * C, 0.0)
    c = (-2.0 * C) / (B + np.sqrt(disc))  # the positive root, without cancellation
    return float(min(max(c, 0.0), float(v_ref)))

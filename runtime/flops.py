"""Exact language-model prefill FLOPs of a (pruned) decoder stack, from the model config: the one formula.

Pure numpy (the runtime meets a strict per-request budget with it; ``recipe_compiler.flops``
builds the compiler's tables on it). Conventions (DESIGN.md §4):

* 2 FLOPs per multiply-add.
* Per decoder layer and token: q projection ``d·(h·hd)``, k and v projections ``d·(kv·hd)`` each
  (grouped-query attention), o projection ``(h·hd)·d``, gated MLP ``3·d·m`` multiply-adds.
* Causal attention: query ``i`` (0-based) attends to ``i + 1`` keys, so the scores ``QKᵀ`` and the
  weighted values ``AV`` each cost ``h·hd·n(n+1)/2`` multiply-adds for ``n`` tokens.
* RMSNorms, activations, RoPE, softmax, residual adds, embeddings and the LM head are ignored: they
  are linear in ``n`` and well under 1 % of a 7B layer.
* A gated attention output (Qwen3.5's ``attn_output_gate``) doubles the q projection (query + gate).
* **Linear-attention layers** (Qwen3.5's Gated DeltaNet, ``layer_types == "linear_attention"``), with
  ``Hk`` key heads of ``dk``, ``Hv`` value heads of ``dv`` and a ``K``-tap conv, per token:
  projections ``d·(2·Hk·dk + Hv·dv)`` (q, k, v), ``d·Hv·dv`` (output gate z), ``2·d·Hv`` (β and the
  decay ``a``), the depthwise causal conv ``(2·Hk·dk + Hv·dv)·K``, the delta-rule state update on a
  ``dk × dv`` state per value head, ``3·Hv·dk·dv`` (read ``kᵀS``, the rank-one write ``k ⊗ β(v − kᵀS)``,
  the output ``qᵀS``; the state's decay is elementwise and ignored like the norms), the output
  projection ``Hv·dv·d`` and the same gated MLP. No term grows with ``n²``: pruning before such a
  layer saves its compute linearly, and it holds no per-token KV. This is the recurrent form's
  count; the chunked kernel HF runs at prefill does the same products regrouped into chunks.
* **Sliding-window layers** (Gemma 3's local layers, ``layer_types == "sliding_attention"``, window
  ``W``): query ``i`` attends to the last ``min(i + 1, W)`` keys, so scores and values each cost
  ``h·hd·T_W(n)`` multiply-adds with ``T_W(n) = n(n+1)/2`` for ``n <= W`` and
  ``W(W+1)/2 + (n − W)·W`` beyond; the projections and MLP are a full layer's. After pruning the
  window counts slots of the pruned sequence (the runtime masks it so), so ``n`` is the tokens
  entering the layer either way.
* **Bidirectional image blocks** (Gemma 3: the tokens of one image attend to each other both ways
  at prefill): each of those ``k`` tokens also reads the later tokens of its image, ``k(k−1)/2``
  more score/value pairs per layer of either kind (the window bounds only earlier keys). The model
  counts a prompt's visual tokens as one block: exact for one image, and for several images it
  counts the pairs across images too (never less than what runs).

Visual-token counts in schedules are given for a reference count ``v_ref`` (the recipe is a ratio);
a sample with ``n_visual`` visual tokens keeps ``round_half_up(k · n_visual / v_ref)`` of them
(:func:`scale_counts`).

A scoring probe's work is each scorer's :meth:`~runtime.methods.scorers.base.Scorer.probe_macs`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

LAYER_KINDS = ("full_attention", "sliding_attention", "linear_attention")
"""Decoder layer kinds the FLOPs model counts."""

__all__ = ["LMShape", "LAYER_KINDS", "layer_flops", "stack_flops", "attention_pairs", "prefill_flops", "scale_counts",
           "request_flops", "fit_keep_counts"]


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
    layer_kinds: tuple = field(default=(), repr=False)
    """Each layer's kind (one of :data:`LAYER_KINDS`); empty: all full attention."""
    gated_attention: bool = field(default=False, repr=False)
    """A gated attention output: the q projection also produces the gate (width ``2·h·hd``)."""
    linear_key_heads: int = field(default=0, repr=False)
    linear_value_heads: int = field(default=0, repr=False)
    linear_key_dim: int = field(default=0, repr=False)
    linear_value_dim: int = field(default=0, repr=False)
    linear_conv_kernel: int = field(default=0, repr=False)
    sliding_window: int = field(default=0, repr=False)
    """Keys a ``sliding_attention`` layer's query reads at most (itself included); 0: no such layers."""
    bidirectional_visual: bool = field(default=False, repr=False)
    """The visual tokens of a prompt attend to each other both ways at prefill (Gemma 3's image blocks)."""

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden", "intermediate", "num_heads", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"LMShape.{name}={value!r} is invalid; it must be a positive integer")
            object.__setattr__(self, name, int(value))
        kinds = tuple(str(k) for k in self.layer_kinds)
        unknown = sorted(set(kinds) - set(LAYER_KINDS))
        if unknown or (kinds and len(kinds) != self.num_layers):
            raise ValueError(f"LMShape.layer_kinds must hold one of {', '.join(LAYER_KINDS)} per layer ({self.num_layers}), got {kinds!r}")
        object.__setattr__(self, "layer_kinds", kinds)
        linear = ("linear_key_heads", "linear_value_heads", "linear_key_dim", "linear_value_dim", "linear_conv_kernel")
        for name in linear:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"LMShape.{name}={value!r} is invalid; it must be a non-negative integer")
            object.__setattr__(self, name, int(value))
        if "linear_attention" in kinds and min(getattr(self, n) for n in linear) < 1:
            raise ValueError("LMShape has linear_attention layers but no linear-attention sizes; set " + ", ".join(linear))
        window = self.sliding_window
        if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 0:
            raise ValueError(f"LMShape.sliding_window={window!r} is invalid; it must be a non-negative integer")
        object.__setattr__(self, "sliding_window", int(window))
        if "sliding_attention" in kinds and self.sliding_window < 1:
            raise ValueError("LMShape has sliding_attention layers but sliding_window is 0; set the window (text_config.sliding_window)")
        object.__setattr__(self, "bidirectional_visual", bool(self.bidirectional_visual))

    @classmethod
    def from_config(cls, text_config: Any, bidirectional_visual: bool = False) -> "LMShape":
        """Read the shape from a Hugging Face text config (duck-typed).

        Args:
            text_config: an object with ``num_hidden_layers``, ``hidden_size``,
                ``intermediate_size``, ``num_attention_heads`` and optionally
                ``num_key_value_heads`` (default: the head count) and ``head_dim`` (default:
                ``hidden_size // num_attention_heads``), ``layer_types`` and ``sliding_window``
                where the layers differ in kind. A multimodal config that only carries a
                ``text_config`` attribute is unwrapped.
            bidirectional_visual: the model lets a prompt's visual tokens attend to each other
                both ways (a family fact: ``runtime.families.Family.bidirectional_visual``).

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
        kinds = tuple(getattr(text_config, "layer_types", None) or ())
        hybrid = "linear_attention" in kinds
        linear = lambda name: int(getattr(text_config, name, 0) or 0) if hybrid else 0  # noqa: E731
        sliding = "sliding_attention" in kinds
        return cls(
            num_layers=int(text_config.num_hidden_layers),
            hidden=hidden,
            intermediate=int(text_config.intermediate_size),
            num_heads=heads,
            num_kv_heads=int(kv) if kv is not None else heads,
            head_dim=int(head_dim) if head_dim is not None else hidden // heads,
            layer_kinds=kinds if hybrid or sliding else (),
            gated_attention=bool(getattr(text_config, "attn_output_gate", False)) and hybrid,
            linear_key_heads=linear("linear_num_key_heads"),
            linear_value_heads=linear("linear_num_value_heads"),
            linear_key_dim=linear("linear_key_head_dim"),
            linear_value_dim=linear("linear_value_head_dim"),
            linear_conv_kernel=linear("linear_conv_kernel_dim"),
            sliding_window=int(getattr(text_config, "sliding_window", 0) or 0) if sliding else 0,
            bidirectional_visual=bool(bidirectional_visual),
        )

    @property
    def projection_macs_per_token(self) -> int:
        """Multiply-adds per token of the q/k/v/o projections and the gated MLP of one layer."""
        d, qd, kvd = self.hidden, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q_width = 2 * qd if self.gated_attention else qd
        return d * q_width + 2 * d * kvd + qd * d + 3 * d * self.intermediate

    @property
    def linear_macs_per_token(self) -> int:
        """Multiply-adds per token of one linear-attention (Gated DeltaNet) layer, its MLP included.

        ``d·(2·Hk·dk + Hv·dv) + d·Hv·dv + 2·d·Hv + (2·Hk·dk + Hv·dv)·K + 3·Hv·dk·dv + Hv·dv·d + 3·d·m``
        (see the module docstring).
        """
        d, m = self.hidden, self.intermediate
        hk, hv, dk, dv, k = (self.linear_key_heads, self.linear_value_heads, self.linear_key_dim,
                             self.linear_value_dim, self.linear_conv_kernel)
        conv = 2 * hk * dk + hv * dv
        return d * conv + d * hv * dv + 2 * d * hv + conv * k + 3 * hv * dk * dv + hv * dv * d + 3 * d * m

    @property
    def kinds(self) -> tuple[str, ...]:
        """Each layer's kind (all ``"full_attention"`` when :attr:`layer_kinds` is empty)."""
        return self.layer_kinds or ("full_attention",) * self.num_layers

    def _coefficients(self) -> tuple[float, float]:
        """``(a, b)`` with ``layer_flops(n) = a·n + b·n²`` for a full-attention layer (FLOPs, float64)."""
        qd = self.num_heads * self.head_dim
        # 2 FLOPs/MAC × (projections·n + 2 matmuls × qd·n(n+1)/2)
        return 2.0 * (self.projection_macs_per_token + qd), 2.0 * qd

    @property
    def quadratic(self) -> bool:
        """Whether every layer costs ``a·n + b·n²`` (no sliding window, no bidirectional image blocks)."""
        return "sliding_attention" not in self.kinds and not self.bidirectional_visual

    def layer_terms(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """float64 ``[num_layers]`` each, ``(linear, pair, window)``: layer ``l`` on ``n`` tokens costs
        ``linear[l]·n + pair[l]·pairs`` FLOPs, ``pairs`` the query–key pairs it scores
        (:func:`attention_pairs`; ``window[l]`` keys at most per query, 0 for none).

        Example:
            >>> [t.tolist() for t in LMShape(2, 2, 3, 1, 1, 2).layer_terms()]
            [[68.0, 68.0], [8.0, 8.0], [0.0, 0.0]]
        """
        kinds = np.array(self.kinds)
        linear_kind = kinds == "linear_attention"
        projections = np.where(linear_kind, 2.0 * self.linear_macs_per_token, 2.0 * self.projection_macs_per_token)
        pair = np.where(linear_kind, 0.0, 4.0 * self.num_heads * self.head_dim)  # scores and values, 2 FLOPs each
        window = np.where(kinds == "sliding_attention", float(self.sliding_window), 0.0)
        return projections.astype(np.float64), pair.astype(np.float64), window.astype(np.float64)

    def layer_coefficients(self) -> tuple[np.ndarray, np.ndarray]:
        """float64 ``[num_layers]`` each, ``(a, b)``: layer ``l`` costs ``a[l]·n + b[l]·n²`` FLOPs on ``n`` tokens.

        Only for :attr:`quadratic` stacks; use :func:`stack_flops` otherwise.

        Raises:
            ValueError: a layer has a sliding window or the prompt's image attends both ways.

        Example:
            >>> LMShape(2, 2, 3, 1, 1, 2).layer_coefficients()[1].tolist()
            [4.0, 4.0]
        """
        if not self.quadratic:
            raise ValueError("this stack's FLOPs are not a·n + b·n² (sliding windows or image blocks); use stack_flops")
        projections, pair, _ = self.layer_terms()
        return projections + pair / 2.0, pair / 2.0


def _pairs(n: np.ndarray, window: Any) -> np.ndarray:
    """Causal query–key pairs of ``n`` tokens, each query reading at most ``window`` keys (0: all)."""
    causal = n * (n + 1.0) / 2.0
    window = np.asarray(window, dtype=np.float64)
    capped = window * (window + 1.0) / 2.0 + (n - window) * window
    return np.where((window > 0) & (n > window), capped, causal)


def attention_pairs(shape: LMShape, tokens_per_layer: Any, visual_per_layer: Any = 0) -> np.ndarray:
    """Query–key pairs each layer's attention scores (0 for linear-attention layers).

    Args:
        shape: the model sizes.
        tokens_per_layer: token counts ``[..., num_layers]`` entering each layer.
        visual_per_layer: the visual tokens among them (broadcast), for a stack whose image
            tokens attend to each other both ways (:attr:`LMShape.bidirectional_visual`).

    Returns:
        float64 ``[..., num_layers]``: causal pairs (``T_W(n)`` under a window ``W``) plus ``k(k−1)/2``
        for ``k`` visual tokens attending both ways.

    Example:
        >>> s = LMShape(2, 2, 3, 1, 1, 2, layer_kinds=("sliding_attention", "full_attention"), sliding_window=2)
        >>> attention_pairs(s, [4, 4]).tolist()  # window 2: 1 + 2 + 2 + 2; causal: 10
        [7.0, 10.0]
    """
    n = np.asarray(tokens_per_layer, dtype=np.float64)
    _, pair, window = shape.layer_terms()
    pairs = _pairs(n, window)
    if shape.bidirectional_visual:
        k = np.broadcast_to(np.asarray(visual_per_layer, dtype=np.float64), n.shape)
        pairs = pairs + k * np.maximum(k - 1.0, 0.0) / 2.0
    return np.where(pair > 0, pairs, 0.0)


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
    """Exact prefill FLOPs of one full-attention decoder layer processing ``n_tokens`` tokens.

    For a stack with layers of other kinds use :func:`stack_flops` (each layer by its kind).

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


def stack_flops(shape: LMShape, tokens_per_layer: Any, visual_per_layer: Any = None) -> np.ndarray:
    """FLOPs of each layer of the stack on the tokens entering it, each layer by its own kind.

    Args:
        shape: the model sizes.
        tokens_per_layer: token counts ``[..., num_layers]`` (the last axis is the layer).
        visual_per_layer: the visual tokens among them (same shape or broadcast); needed only
            where :attr:`LMShape.bidirectional_visual` (the image's block attention), else ignored.

    Returns:
        float64 of the same shape.

    Raises:
        ValueError: counts negative or of the wrong shape, or visual counts missing where needed.

    Example:
        >>> s = LMShape(num_layers=2, hidden=2, intermediate=3, num_heads=1, num_kv_heads=1, head_dim=2)
        >>> stack_flops(s, [1, 1]).tolist()
        [76.0, 76.0]
    """
    n = np.asarray(tokens_per_layer)
    if n.dtype.kind == "b" or n.dtype.kind not in "iuf" or np.any(n < 0) or not np.all(np.isfinite(n)):
        raise ValueError(f"tokens_per_layer must be non-negative finite numbers, got {tokens_per_layer!r}")
    if n.ndim == 0 or n.shape[-1] != shape.num_layers:
        raise ValueError(f"tokens_per_layer has shape {n.shape}; its last axis needs one count per layer ({shape.num_layers})")
    if shape.bidirectional_visual and visual_per_layer is None:
        raise ValueError("this model's image tokens attend both ways: pass visual_per_layer to count their attention")
    n = n.astype(np.float64)
    projections, pair, _ = shape.layer_terms()
    return projections * n + pair * attention_pairs(shape, n, 0 if visual_per_layer is None else visual_per_layer)


def prefill_flops(shape: LMShape, tokens_entering_each_layer: Any, visual_entering_each_layer: Any = None) -> float:
    """Prefill FLOPs of the whole decoder stack for one prompt.

    Args:
        shape: the model sizes.
        tokens_entering_each_layer: int ``[num_layers]``, tokens processed by each layer.
        visual_entering_each_layer: the visual tokens among them (see :func:`stack_flops`).

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
    return float(np.sum(stack_flops(shape, tokens, visual_entering_each_layer)))


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


def request_flops(shape: LMShape, keep: Any, n_other: int, n_before: int, n_text: int, probe_layers: Any = (),
                  probe_macs: Any = None) -> np.ndarray:
    """Prefill FLOPs of one request for candidate keep counts, its scorer's probes included.

    Args:
        shape: the language model's sizes.
        keep: int ``[L]`` or ``[n, L]``: visual tokens entering each layer (``keep[0]``: those that
            reach the language model).
        n_other: the request's non-visual real prompt tokens (system prompt, text, image markers).
        n_before, n_text: real tokens before and after the image (the probe's query rows).
        probe_layers: the recipe's pruning layers; each runs the probe on the row entering the
            layer before it, whether or not this request's count falls there.
        probe_macs: the scorer's :meth:`~runtime.methods.scorers.base.Scorer.probe_macs`; None: no probe.

    Returns:
        float64 ``[n]`` (``[1]`` for one schedule).

    Example:
        >>> s = LMShape(num_layers=2, hidden=2, intermediate=3, num_heads=1, num_kv_heads=1, head_dim=2)
        >>> request_flops(s, [2, 1], 1, 0, 1, (1,), lambda shape, n, v, b, t: n * 10.0).tolist()  # 252 + 160 + 2·30
        [472.0]
    """
    k = np.atleast_2d(np.asarray(keep, dtype=np.float64))
    tokens = n_other + k
    total = np.sum(stack_flops(shape, tokens, k), axis=1)
    if probe_macs is not None:
        for layer in probe_layers:
            before = k[:, layer - 1]
            total = total + 2.0 * np.asarray(probe_macs(shape, n_other + before, before, float(n_before), float(n_text)),
                                             dtype=np.float64)
    return total


def fit_keep_counts(shape: LMShape, keep: Any, n_visual: int, n_other: int, n_before: int, n_text: int, budget: float,
                    probe_layers: Any = (), probe_macs: Any = None) -> tuple[np.ndarray, bool]:
    """One request's keep counts, scaled down from the recipe's until its own FLOPs fit ``budget``.

    The schedule keeps its shape: counts before the first cut stay, and from the first cut on
    every count becomes ``floor(j · keep[l] / m)`` with ``m = keep[first cut]``, for the largest
    ``j <= m`` whose FLOPs (:func:`request_flops`, probes included) are at most ``budget`` times
    the request's unpruned prefill (every visual token at every layer, no probe). ``j = m`` gives
    the counts back unchanged, so a request the recipe already fits is not touched. All
    candidates are evaluated at once (``m + 1`` schedules): no assumption that FLOPs fall with
    ``j``, and the result is exact to one token of the largest count.

    Args:
        shape: the language model's sizes.
        keep: int ``[L]``, the recipe's counts for this request (``keep[0]``: visual tokens that
            reach the language model, after any pre-LLM stage).
        n_visual: the request's visual tokens before any pruning (the unpruned cost's).
        n_other, n_before, n_text, probe_layers, probe_macs: as for :func:`request_flops`.
        budget: the fraction of the request's unpruned prefill FLOPs it may spend.

    Returns:
        ``(counts int64 [L], met)``: ``met`` is False when even ``j = 0`` (every visual token
        dropped at the first cut) spends more than the budget; the counts are then those of ``j = 0``.

    Example:
        >>> s = LMShape(num_layers=3, hidden=2, intermediate=3, num_heads=1, num_kv_heads=1, head_dim=2)
        >>> fit_keep_counts(s, [4, 2, 2], 4, 1, 0, 1, 0.6)
        (array([4, 1, 1]), True)
    """
    k = np.asarray(keep, dtype=np.int64)
    cuts = np.nonzero(np.diff(k) < 0)[0] + 1
    unpruned = float(np.sum(stack_flops(shape, np.full(k.shape, n_other + n_visual, dtype=np.float64),
                                        np.full(k.shape, n_visual, dtype=np.float64))))
    limit = budget * unpruned
    if cuts.size == 0 or k[cuts[0]] == 0:  # nothing after a cut to scale
        return k, bool(request_flops(shape, k, n_other, n_before, n_text, probe_layers, probe_macs)[0] <= limit)
    first, m = int(cuts[0]), int(k[cuts[0]])
    j = np.arange(m + 1, dtype=np.int64)[:, None]
    candidates = np.repeat(k[None, :], m + 1, axis=0)
    candidates[:, first:] = (j * k[None, first:]) // m
    ok = np.flatnonzero(request_flops(shape, candidates, n_other, n_before, n_text, probe_layers, probe_macs) <= limit)
    if ok.size == 0:
        return candidates[0], False
    return candidates[ok[-1]], True

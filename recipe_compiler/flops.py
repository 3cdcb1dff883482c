"""Exact language-model prefill FLOPs of a (pruned) decoder stack, from the model config.

Pure numpy. Conventions (DESIGN.md §4):

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

Reported beside the budget, never part of it: the vision encoder + projector FLOPs
(:class:`VisionShape`, built per family by ``recipe_compiler.families``; :func:`encoder_flops`) and
the visual-token-only fraction (:func:`visual_token_fraction`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

LAYER_KINDS = ("full_attention", "sliding_attention", "linear_attention")
"""Decoder layer kinds the FLOPs model counts."""

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


def probe_flops(shape: LMShape, n_other: Any, n_visual: Any, keep_counts: Any, v_ref: int, probe_macs: Any) -> float:
    """Mean FLOPs over samples that a scorer's own probes add to a schedule (0 for most scorers).

    At each pruning layer ``l`` (``keep[l] < keep[l − 1]``) the scorer sees the row's tokens before
    the cut: ``n_other + scale(keep[l − 1])`` real tokens, of which ``scale(keep[l − 1])`` visual.

    Args:
        probe_macs: ``probe_macs(shape, n_tokens, n_visual) -> multiply-adds`` (vectorised over
            numpy arrays), a scorer's :meth:`~runtime.methods.scorers.base.Scorer.probe_macs`.

    Example:
        >>> s = LMShape(num_layers=2, hidden=2, intermediate=3, num_heads=1, num_kv_heads=1, head_dim=2)
        >>> probe_flops(s, [1], [2], [2, 1], 2, lambda shape, n, v: n * 10.0)   # one cut, 3 tokens before it
        60.0
    """
    v_ref = _check_v_ref(v_ref)
    other, visual = _check_samples(n_other, n_visual)
    keep = _check_keep(keep_counts, shape, v_ref)
    total = np.zeros(other.shape[0], dtype=np.float64)
    for layer in np.nonzero(np.diff(keep) < 0)[0] + 1:
        before = scale_counts(np.full(other.shape[0], keep[layer - 1]), visual, v_ref).astype(np.float64)
        total += 2.0 * np.asarray(probe_macs(shape, other + before, before), dtype=np.float64)
    return float(np.mean(total))


def min_feasible_budget(shape: LMShape, n_other: Any, n_visual: Any, v_ref: int, first_cut: int = 1) -> float:
    """The smallest budget any schedule can meet: all visual tokens up to the first layer a cut may
    enter, none afterwards.

    Args:
        shape: the model sizes.
        n_other: int ``[S]``, non-visual prompt tokens per sample.
        n_visual: int ``[S]``, visual tokens per sample.
        v_ref: reference visual-token count.
        first_cut: the first layer a cut may enter (1; later where layer 0 has no attention rows to
            score by, e.g. Qwen3.5's linear attention).

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

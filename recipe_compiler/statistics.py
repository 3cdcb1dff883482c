"""Calibration statistics: the per-sample, per-layer, per-visual-token attention the search reads.

A pure container (numpy arrays; the pre-LLM stage registry names the pre-LLM score arrays). The
calibration pass that fills it lives in ``recipe_compiler.collect``; the searches read it and never
touch torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from runtime.methods.stages import STAGES


@dataclass(frozen=True)
class Statistics:
    """Attention statistics of the unpruned model on a calibration set.

    Shapes use S samples, L decoder layers and V = max visual tokens over samples. Entries of a
    sample beyond its own visual count (``j >= n_visual[s]``) are NaN. ``A`` is the post-softmax
    attention of one layer reduced over heads (``head_reduce``: "max", as FitPrune, or "mean").

    Attributes:
        cross: float32 [S, L, V]. Mean over text queries (every real token after the last visual
            token) of ``A[q, j]``.
        self_attn: float32 [S, L, V]. Sum over visual queries of ``A[q, j]``, divided by the
            sample's visual-token count; None in text-only statistics (collected with
            ``rows="text"`` for the ``text`` objective: no visual query row is computed).
        last: float32 [S, L, V]. ``A[last prompt token, j]`` (the FastV / PyramidDrop row).
        n_visual: int64 [S]. Visual tokens of each sample.
        n_text: int64 [S]. Text tokens after the image (the queries averaged into ``cross``).
        n_tokens: int64 [S]. All real (non-padding) prompt tokens, visual ones included.
        head_reduce: "max" or "mean".
        model_fingerprint: JSON string of the model fingerprint the statistics were taken on.
        calibration_fingerprint: hex digest of the calibration set (images and prompts).
        prellm: optional pre-LLM scores per visual token (prompt order), float32 [S, V] each, NaN
            beyond a sample's count: ``gprune`` (G-Prune propagated information, default
            parameters), ``fopru`` (CLS→patch attention at the vision feature layer, head mean),
            ``clssim`` (patch–CLS cosine similarity at the feature layer), only those the model
            supports, plus ``view`` (the token's view index in its sample: LLaVA-NeXT base /
            high-res) and ``grid_row`` (its row in that view's grid). Empty when the model has no
            supported pre-LLM stage.
        prellm_params: JSON of the G-Prune parameters ``gprune`` was computed with and the
            FoPru ``feature_layer`` (``hidden_states`` index) of ``fopru``.
        n_before: int64 [S] or None. Real tokens before each sample's first image token (the
            system prompt), which a probe's query rows start after; None in statistics saved
            before it was recorded (:attr:`before_image` then derives it).
    """

    cross: np.ndarray
    self_attn: np.ndarray | None
    last: np.ndarray
    n_visual: np.ndarray
    n_text: np.ndarray
    n_tokens: np.ndarray
    head_reduce: str = "max"
    model_fingerprint: str = ""
    calibration_fingerprint: str = ""
    prellm: dict = field(default_factory=dict)
    prellm_params: str = ""
    n_before: np.ndarray | None = None

    @property
    def before_image(self) -> np.ndarray:
        """Real tokens before each sample's image, int64 [S]: :attr:`n_before`, or, when the
        statistics predate it, every non-visual token that is not text after the image."""
        if self.n_before is not None:
            return np.asarray(self.n_before, dtype=np.int64)
        return self.n_other - self.n_text

    @property
    def num_samples(self) -> int:
        return int(self.cross.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.cross.shape[1])

    @property
    def max_visual(self) -> int:
        return int(self.cross.shape[2])

    @property
    def n_other(self) -> np.ndarray:
        """Non-visual real prompt tokens of each sample (system, text), int64 [S]."""
        return self.n_tokens - self.n_visual

    @property
    def w_cross(self) -> np.ndarray:
        """Sum of ``cross`` over each sample's visual tokens, float64 [S, L]."""
        return np.nansum(self.cross.astype(np.float64), axis=-1)

    @property
    def w_self(self) -> np.ndarray:
        """Sum of ``self_attn`` over each sample's visual tokens, float64 [S, L]."""
        if self.self_attn is None:
            raise ValueError("these statistics are text-only (no visual query rows); FitPrune's rule needs them")
        return np.nansum(self.self_attn.astype(np.float64), axis=-1)

    @property
    def text_only(self) -> bool:
        """Whether the statistics hold only the text and last-token rows (no ``self_attn``)."""
        return self.self_attn is None

    @property
    def distributions(self) -> tuple:
        """The attention distributions over the visual tokens whose lost mass the divergence averages:
        ``(cross, self_attn)``, or ``(cross,)`` for text-only statistics."""
        return (self.cross,) if self.self_attn is None else (self.cross, self.self_attn)

    def text_rows_only(self) -> "Statistics":
        """The same statistics without the visual rows (what a text-only pass would have collected)."""
        from dataclasses import replace

        return replace(self, self_attn=None)


_ARRAYS = ("cross", "last", "n_visual", "n_text", "n_tokens")  # and self_attn unless text-only
_STATS_SCHEMA = "recipe_compiler.statistics/1"
# Each pre-LLM stage's recorded scores (its ``statistic``), then each token's view and grid row.
PRELLM_SCORES = (*dict.fromkeys(stage.statistic for stage in STAGES.values()), "view", "grid_row")


def save_statistics(stats: Statistics, path) -> None:
    """Write statistics to a safetensors file (atomically) for reuse with ``--stats``.

    The same statistics give the same bytes (sorted metadata and tensors, as recipes are written).

    Args:
        stats: what :func:`recipe_compiler.collect.collect_statistics` returned.
        path: destination file.

    Raises:
        StatisticsError: the destination cannot be written.

    Example:
        >>> save_statistics(stats, "stats.safetensors")   # doctest: +SKIP
    """
    from runtime.recipe import encode_safetensors, write_atomic

    from .errors import StatisticsError

    metadata = {
        "schema": _STATS_SCHEMA,
        "head_reduce": stats.head_reduce,
        "model_fingerprint": stats.model_fingerprint,
        "calibration_fingerprint": stats.calibration_fingerprint,
        "prellm_params": stats.prellm_params,
    }
    arrays = {name: np.ascontiguousarray(getattr(stats, name)) for name in _ARRAYS}
    if stats.self_attn is not None:
        arrays["self_attn"] = np.ascontiguousarray(stats.self_attn)
    arrays.update({f"prellm_{name}": np.ascontiguousarray(value) for name, value in stats.prellm.items()})
    if stats.n_before is not None:
        arrays["n_before"] = np.ascontiguousarray(stats.n_before, dtype=np.int64)
    data = encode_safetensors(arrays, metadata)
    try:
        write_atomic(path, data)
    except OSError as exc:
        raise StatisticsError(f"cannot write statistics to {path}: {exc.strerror or exc}") from None


def load_statistics(path) -> Statistics:
    """Read statistics written by :func:`save_statistics`.

    Raises:
        StatisticsError: missing, unreadable or not a statistics file (the message names it).
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from runtime.recipe import special_file_kind

    from .errors import StatisticsError

    kind = special_file_kind(path)
    if kind is not None:  # opening a FIFO for reading blocks until something writes to it
        raise StatisticsError(f"statistics path {path} is {kind}, not a statistics file; pass the file --save-stats wrote")
    try:
        import json

        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
        arrays = load_file(str(path))
    except FileNotFoundError:
        raise StatisticsError(f"statistics file {path} not found") from None
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as exc:
        raise StatisticsError(f"{path} is not a statistics file: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if metadata.get("schema") != _STATS_SCHEMA or any(name not in arrays for name in _ARRAYS):
        raise StatisticsError(f"{path} is not a recipe-compiler statistics file (schema {metadata.get('schema')!r})")
    s, l, v = arrays["cross"].shape if arrays["cross"].ndim == 3 else (0, 0, 0)
    if s == 0 or any(arrays[n].shape != (s, l, v) for n in ("self_attn", "last") if n in arrays) or any(arrays[n].shape != (s,) for n in ("n_visual", "n_text", "n_tokens")):
        raise StatisticsError(f"{path} has inconsistent array shapes; recollect the statistics")
    prellm = {name: arrays[f"prellm_{name}"] for name in PRELLM_SCORES if f"prellm_{name}" in arrays}
    if any(value.shape != (s, v) for value in prellm.values()):
        raise StatisticsError(f"{path} has inconsistent pre-LLM score shapes; recollect the statistics")
    if "n_before" in arrays and arrays["n_before"].shape != (s,):
        raise StatisticsError(f"{path} has an inconsistent n_before shape; recollect the statistics")
    return Statistics(
        **{name: arrays[name] for name in _ARRAYS},
        self_attn=arrays.get("self_attn"),
        n_before=arrays.get("n_before"),
        prellm=prellm,
        prellm_params=metadata.get("prellm_params", ""),
        head_reduce=metadata.get("head_reduce", "max"),
        model_fingerprint=metadata.get("model_fingerprint", ""),
        calibration_fingerprint=metadata.get("calibration_fingerprint", ""),
    )

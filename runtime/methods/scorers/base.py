"""What an in-LLM scorer is, and the registry of scorers (``SCORERS``).

At a pruning layer ``l`` the runtime ranks the visual tokens still alive and keeps the recipe's
count of the best. A scorer names the query rows of layer ``l − 1``'s attention it needs
(:meth:`Scorer.groups`; the attention probe sums only those rows, head-reduced) and turns the sums
into one score per key (:meth:`Scorer.scores`); higher scores survive, ties go by position.
Offline, the same ranking is approximated from the calibration statistics
(:meth:`Scorer.from_statistics`), so the search plans with what the runtime will do.

A scorer's head reduction is part of its definition (:attr:`Scorer.head_reduce`, the reference's
own: FitPrune max, FastV / PyramidDrop mean); a recipe records it, and an explicit
``--head-reduce`` overrides it.

Scorers of the peer methods read more than attention row sums. Three optional hooks cover them
(the default of each does nothing), all called by ``RecipePolicy`` with a per-request ``state``
dict that is kept per thread (scorer instances are shared and stateless):

* :meth:`Scorer.on_inputs` sees the language model's input embeddings (SparseVLM's raters);
* :meth:`Scorer.on_attention` sees a probed layer's post-RoPE queries and keys (DART's key
  norms, SparseVLM's per-head rater attention) instead of the default row sums;
* :meth:`Scorer.on_layer_input` sees the hidden states and keyword arguments entering a layer
  (:attr:`Scorer.input_offsets` says which, relative to each pruning layer): PyramidDrop's
  own-layer q/k probe, DART's normed hidden states, SparseVLM's RoPE tables.

``attention_probe = False`` installs no attention probe at all. Work a scorer does that the
model itself does not (the probe's recomputed attention rows, PyramidDrop's projections) is
declared by :meth:`Scorer.probe_macs` so the FLOPs model, the searches and the budget count it.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ...registry import Registry

SCORERS = Registry("scorer")
"""name → :class:`Scorer`; filled by the scorer modules, in the order the package imports them."""


def register_scorer(name: str) -> Callable[[type], type]:
    """Class decorator: register one instance of a :class:`Scorer` subclass under ``name``."""

    def wrap(cls: type) -> type:
        cls.name = name
        SCORERS.register(name, cls())
        return cls

    return wrap


class Scorer:
    """One run-time scorer.

    Attributes:
        name: the registry name, as recipes and the CLI spell it.
    """

    name = ""
    method: str | None = None
    """A peer method's own scorer: the name of the compiler search (``--search``) that plans its schedule."""
    head_reduce = "max"
    """The head reduction the scorer's reference uses (a ``HEAD_REDUCTIONS`` name): the default."""
    attention_probe = True
    """Whether the attention of layer ``l − 1`` is probed for a pruning layer ``l``."""
    input_offsets: tuple = ()
    """Layers, relative to each pruning layer (0: the pruning layer itself, −1: the probed one),
    whose inputs :meth:`on_layer_input` receives."""
    needs_visual_rows = False
    """Whether :meth:`from_statistics` reads ``self_attn`` (the visual query rows), which text-only
    calibration statistics do not hold."""

    def unsupported_reason(self, model) -> str | None:
        """Why this scorer cannot run on ``model`` (one line naming the missing part), or None."""
        return None

    def on_inputs(self, state: dict, embeds: torch.Tensor, roles) -> None:
        """The (B, L, D) language-model input embeddings of a prefill (after the per-request reset)."""

    def on_attention(self, state: dict, layer: int, query: torch.Tensor, key: torch.Tensor, mask, scaling: float, roles) -> bool:
        """Probed layer ``layer``'s post-RoPE query (B, H, L, hd) and keys (B, KV, L, hd).

        Return True when handled (``state["scores"]`` set or what the scorer needs kept); False
        (the default) lets the runtime compute the :meth:`groups` row sums and call :meth:`scores`.
        """
        return False

    def on_layer_input(self, state: dict, layer: int, module: torch.nn.Module, hidden: torch.Tensor, kwargs: dict, roles,
                       context: dict) -> None:
        """The hidden states (B, L, D) and keyword arguments (``position_embeddings``, …) entering
        decoder layer ``layer`` (one of :attr:`input_offsets` from a pruning layer), before it is pruned.

        ``context`` holds model parts the policy found at apply time (``final_norm``).
        """

    def rank(self, state: dict, layer: int, roles) -> torch.Tensor:
        """(B, L) scores for the pruning layer ``layer``; higher survive. Default: the probe's."""
        return state["scores"]

    probe_groups = 1
    """Row groups :meth:`groups` returns (the ``G`` of the probe's weighted row sums)."""

    def probe_first_row(self, n_tokens, n_visual, n_before, n_text):
        """The first query row the attention probe needs; it needs every row from there to the last.

        Args: as :meth:`probe_macs`. Returns: a row index (scalar or array). Default 0 (every row,
        the most the probe can compute): a scorer reading fewer rows says which.
        """
        return np.zeros_like(np.asarray(n_tokens, dtype=np.float64))

    def probe_macs(self, shape, n_tokens, n_visual, n_before, n_text):
        """Multiply-adds a pruning layer's scoring adds beyond the model's own work, for one request.

        Args:
            shape: an object with ``hidden``, ``num_heads``, ``num_kv_heads``, ``head_dim``
                (``recipe_compiler.flops.LMShape``).
            n_tokens, n_visual: real and visual tokens of the row entering the probed layer (the
                pruning layer's tokens before it prunes); numpy arrays or scalars.
            n_before: real tokens before the image (system prompt); ``n_text``: real tokens after
                it. Neither changes with pruning.

        Returns:
            float64 multiply-adds (vectorised over the arguments).

        Default: the attention probe's (:func:`runtime.attention.row_sum_macs`): it recomputes
        ``QKᵀ`` for the rows from :meth:`probe_first_row` on, in :data:`runtime.attention.PROBE_CHUNK`
        row chunks against the keys up to each chunk's end, and sums :attr:`probe_groups` weighted
        rows. Not free: the model's own attention kernel never materialises those rows. A scorer
        with no attention probe and no work of its own costs 0.

        Example:
            >>> from types import SimpleNamespace
            >>> from runtime.methods.scorers import SCORERS
            >>> shape = SimpleNamespace(hidden=8, num_heads=2, num_kv_heads=2, head_dim=4)
            >>> float(SCORERS["last-token"].probe_macs(shape, 10, 4, 2, 4))  # 1 row · 10 keys · (2·4 + 1)
            90.0
        """
        from ...attention import row_sum_macs

        if not self.attention_probe:
            return np.zeros_like(np.asarray(n_tokens, dtype=np.float64))
        first = self.probe_first_row(n_tokens, n_visual, n_before, n_text)
        return row_sum_macs(shape.num_heads, shape.head_dim, self.probe_groups, first, n_tokens)

    def groups(self, text: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """(B, G, L) weights of the query rows to sum, for the current sequence's role masks.

        Args:
            text: (B, L) bool, text tokens after the image (real ones).
            visual: (B, L) bool, visual tokens still alive.
        """
        raise NotImplementedError

    def scores(self, sums: torch.Tensor, text: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """(B, L) per-key scores from the (B, G, L) row sums of :meth:`groups` (only visual keys matter)."""
        raise NotImplementedError

    def from_statistics(self, cross: np.ndarray, self_attn: np.ndarray, last: np.ndarray, n_text: np.ndarray) -> np.ndarray:
        """float64 ``[S, n, V]``: the score each visual token gets, from calibration statistics.

        Args:
            cross: ``[S, n, V]`` mean attention from the text queries; ``self_attn``: summed
                attention from the visual queries over ``v``; ``last``: from the last prompt token.
            n_text: ``[S]`` text tokens per sample.
        """
        raise NotImplementedError

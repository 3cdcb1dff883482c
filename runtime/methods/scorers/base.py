"""What an in-LLM scorer is, and the registry of scorers (``SCORERS``).

At a pruning layer ``l`` the runtime ranks the visual tokens still alive and keeps the recipe's
count of the best. A scorer names the query rows of layer ``l − 1``'s attention it needs
(:meth:`Scorer.groups`; the attention probe sums only those rows, head-reduced) and turns the sums
into one score per key (:meth:`Scorer.scores`); higher scores survive, ties go by position.
Offline, the same ranking is approximated from the calibration statistics
(:meth:`Scorer.from_statistics`), so the search plans with what the runtime will do.

A scorer that needs no attention rows (e.g. key norms, issue 16) would add a ``probe = False``
attribute and a method scoring from the pruning layer's own inputs; ``RecipePolicy`` then installs
no probe for it and calls that method where it now reads the probe's sums.
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

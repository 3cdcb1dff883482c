"""Random keep inside the LLM: the chance baseline scorer (seeded, deterministic).

At a pruning layer every alive visual token gets a pseudo-random score that depends only on the
current sequence length ``L`` (generator seeded with ``L``), so the same prompt always keeps the
same tokens, in any batch. It asks the attention probe for one row only (the last prompt token's,
as ``last-token`` does) and ignores it. Offline the search plans with seeded random scores too.
"""
from __future__ import annotations

import numpy as np
import torch

from .base import Scorer, register_scorer


@register_scorer("random")
class RandomScorer(Scorer):
    def probe_first_row(self, n_tokens, n_visual, n_before, n_text):
        return np.asarray(n_tokens, dtype=np.float64) - 1.0  # the one row it asks for (and ignores)

    def groups(self, text: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        last = torch.zeros_like(text, dtype=torch.float32)
        last[:, -1] = 1.0
        return last[:, None, :]

    def scores(self, sums: torch.Tensor, text: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        batch, length = text.shape
        generator = torch.Generator().manual_seed(int(length))
        return torch.rand(length, generator=generator).to(sums.device).expand(batch, length)

    def from_statistics(self, cross: np.ndarray, self_attn: np.ndarray, last: np.ndarray, n_text: np.ndarray) -> np.ndarray:
        # One seeded draw per visual position, the same at every layer and sample: the tables are built
        # from slices of layers in chunks, and a draw shaped like the slice would change with the chunking.
        scores = np.broadcast_to(np.random.default_rng(0).random(np.shape(cross)[-1]), np.shape(cross))
        return np.where(np.isnan(cross), np.nan, scores)  # absent tokens stay absent

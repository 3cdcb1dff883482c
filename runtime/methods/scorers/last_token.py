"""The attention each visual token receives from the last prompt token (the FastV / PyramidDrop row)."""
from __future__ import annotations

import numpy as np
import torch

from .base import Scorer, register_scorer


@register_scorer("last-token")
class LastToken(Scorer):
    head_reduce = "mean"  # FastV modeling_llama.py and PyramidDrop average the heads

    def probe_first_row(self, n_tokens, n_visual, n_before, n_text):
        return np.asarray(n_tokens, dtype=np.float64) - 1.0  # one row, against every key

    def groups(self, text: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        last = torch.zeros_like(text, dtype=torch.float32)
        last[:, -1] = 1.0  # the last prompt token is always the last row (padding is on the left)
        return last[:, None, :]

    def scores(self, sums: torch.Tensor, text: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        return sums[:, 0]

    def from_statistics(self, cross: np.ndarray, self_attn: np.ndarray, last: np.ndarray, n_text: np.ndarray) -> np.ndarray:
        return last.astype(np.float64)

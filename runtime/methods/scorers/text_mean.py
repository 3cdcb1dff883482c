"""The mean attention each visual token receives from the text after the image (CLS-inflection's stage 2)."""
from __future__ import annotations

import numpy as np
import torch

from .base import Scorer, register_scorer


@register_scorer("text-mean")
class TextMean(Scorer):
    def probe_first_row(self, n_tokens, n_visual, n_before, n_text):
        return np.asarray(n_tokens, dtype=np.float64) - np.asarray(n_text, dtype=np.float64)  # the text rows

    def groups(self, text: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        return text[:, None, :].float()

    def scores(self, sums: torch.Tensor, text: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        return sums[:, 0] / text.sum(dim=1, keepdim=True).clamp(min=1).float()

    def from_statistics(self, cross: np.ndarray, self_attn: np.ndarray, last: np.ndarray, n_text: np.ndarray) -> np.ndarray:
        return cross.astype(np.float64)

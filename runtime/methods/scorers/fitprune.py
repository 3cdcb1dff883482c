"""FitPrune's run-time score: text attention received times visual attention received.

``score_j = (Σ_text A[q, j]) · (Σ_visual A[q, j] / v)``, ``A`` head-reduced (FitPrune: max); the
reference's formula on full attention is :func:`runtime.scoring.fitprune_scores`.
"""
from __future__ import annotations

import numpy as np
import torch

from .base import Scorer, register_scorer


@register_scorer("fitprune")
class FitPrune(Scorer):
    probe_groups = 2  # text rows, visual rows
    needs_visual_rows = True

    def probe_first_row(self, n_tokens, n_visual, n_before, n_text):
        # From the first visual row to the last text row: the span holds every row after the
        # system prompt (exact when no protected token, e.g. a NeXT newline, precedes the first
        # kept visual token; otherwise an upper bound by those few rows).
        return np.asarray(n_before, dtype=np.float64)

    def groups(self, text: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        return torch.stack([text, visual], dim=1).float()

    def scores(self, sums: torch.Tensor, text: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        n_visual = visual.sum(dim=1, keepdim=True).clamp(min=1).float()
        return sums[:, 0] * (sums[:, 1] / n_visual)

    def from_statistics(self, cross: np.ndarray, self_attn: np.ndarray, last: np.ndarray, n_text: np.ndarray) -> np.ndarray:
        # cross·self·n_text = (Σ_text A)·(Σ_visual A / v)
        return cross.astype(np.float64) * self_attn * np.asarray(n_text, dtype=np.float64)[:, None, None]

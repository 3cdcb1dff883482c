"""FoPru row: whole patch-grid rows by mean significance, then one partial row by rank.

Same signal and parameters as FoPru rank (:mod:`.fopru_rank`); the selection follows the view's
grid (:func:`runtime.prellm.fopru_row_keep`).
"""
from __future__ import annotations

import torch

from ... import prellm
from .base import register_stage
from .fopru_rank import FoPruRank


@register_stage("fopru-row")
class FoPruRow(FoPruRank):
    def keep(self, scores: torch.Tensor, keep_ratio: float | None, grid: tuple[int, int] | None, params: dict) -> torch.Tensor:
        n = scores.shape[0]
        if grid is None or grid[0] * grid[1] != n:
            raise RuntimeError(f"fopru-row needs the view's patch grid; got {grid} for {n} tokens")
        return prellm.fopru_row_keep(scores, grid, prellm.stage_count(keep_ratio, n))

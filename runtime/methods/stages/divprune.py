"""DivPrune (vbdi/divprune): greedy max–min diversity on the language model's input embeddings.

Reads the projected image features at the image positions (every family can run it). Each view
keeps ``round_half_up(keep_ratio · n)`` tokens picked greedily by :func:`runtime.peer_math.divprune.divprune`
(cosine distance; first the token whose nearest neighbour is farthest, then each next the token
farthest from its nearest pick). The greedy order is a prefix order (the picks for ``k`` are the
first ``k`` picks for any larger count), so the calibration statistic is the pick rank over all
tokens and the compiler's survivors are exactly the runtime's. The paper's setting is
``keep_ratio = 0.098`` (``SUBSET_RATIO``; ``--pre-llm-ratio 0.098``); compiled at a budget, the
ratio is searched like any fixed-ratio stage's. Writes no features.
"""
from __future__ import annotations

from typing import Any

import torch

from ... import prellm
from ...peer_math import divprune as math_
from .base import Stage, register_stage, view_tokens

PAPER_RATIO = math_.DEFAULT_RATIO
"""The reference's default share of image tokens kept (``SUBSET_RATIO``)."""


@register_stage("divprune")
class DivPrune(Stage):
    fixed_ratio = True
    statistic = "divprune"

    def scores(self, view: Any, embeds: torch.Tensor | None, params: dict) -> torch.Tensor | None:
        if embeds is None:
            return None
        x = view_tokens(view, embeds)
        n = x.shape[0]
        order, _ = math_.divprune(x, n)
        scores = torch.empty(n, dtype=torch.float32)
        scores[order.cpu()] = torch.arange(n, 0, -1, dtype=torch.float32)  # first pick scores highest
        return scores

    def keep(self, scores: torch.Tensor, keep_ratio: float | None, grid: tuple[int, int] | None, params: dict) -> torch.Tensor:
        return prellm._topk_mask(scores, prellm.stage_count(keep_ratio, scores.shape[0]))

    def select(self, view: Any, embeds: torch.Tensor | None, keep_ratio: float | None, params: dict):
        from .base import Selection

        if embeds is None:
            from ...errors import StageCannotRun

            raise StageCannotRun("DivPrune needs the language model's input embeddings")
        x = view_tokens(view, embeds)
        _, keep = math_.divprune(x, prellm.stage_count(keep_ratio, x.shape[0]))
        return Selection(keep.cpu())

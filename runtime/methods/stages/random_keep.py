"""Random keep: the chance baseline before the LLM (seeded, deterministic).

Each view keeps ``round_half_up(keep_ratio · n)`` of its ``n`` tokens, chosen by a seeded random
ranking that depends only on ``params["seed"]`` (default 0) and ``n``: the same positions for every
image of that size, whatever the batch, device or dtype. It reads no vision signal and no
embedding. A baseline, so ``--pre-llm auto`` never picks it (:attr:`Stage.baseline`).
"""
from __future__ import annotations

from typing import Any

import torch

from ... import prellm
from ...errors import RecipeError
from ...validation import short
from .base import Stage, register_stage


def random_scores(n: int, seed: int = 0) -> torch.Tensor:
    """(n,) float32 scores in [0, 1) from ``torch.Generator`` seeded with ``(seed, n)`` (CPU)."""
    generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(n))
    return torch.rand(int(n), generator=generator)


@register_stage("random")
class RandomKeep(Stage):
    fixed_ratio = True
    statistic = "random"
    defaults = {"seed": 0}
    score_params = ("seed",)
    baseline = True

    def validate(self, params: dict, recipe: Any) -> None:
        if set(params) - {"seed"}:
            raise RecipeError(f"pre-LLM stage 'random': unexpected pre_llm.params {short(sorted(set(params) - {'seed'}))} (only seed)")
        seed = params.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise RecipeError(f"pre-LLM stage 'random': pre_llm.params.seed must be a non-negative integer, got {short(seed)}")

    def describe(self, spec: dict) -> str:
        seed = (spec.get("params") or {}).get("seed", 0)
        return f"keeps a random {spec.get('keep_ratio', 1.0):g} of each image's tokens (seed {seed}; the chance baseline)"

    def scores(self, view: Any, embeds: torch.Tensor | None, params: dict) -> torch.Tensor | None:
        return random_scores(view.positions.numel(), self.resolve(params)["seed"]).to(view.positions.device)

    def keep(self, scores: torch.Tensor, keep_ratio: float | None, grid: tuple[int, int] | None, params: dict) -> torch.Tensor:
        return prellm._topk_mask(scores, prellm.stage_count(keep_ratio, scores.shape[0]))

"""G-Prune: graph propagation of information on the projected visual features (METHODS.md §4).

Reads the language model's input embeddings at the image positions (the projector's output), so
every family can run it. Each view keeps its ``round_half_up(keep_ratio · n)`` best-scored tokens
(:func:`runtime.prellm.gprune_scores`).
"""
from __future__ import annotations

import json
from typing import Any

import torch

from ... import prellm
from ...errors import RecipeError
from ...validation import is_number, short
from .base import Stage, register_stage, view_tokens

RANGES = {"threshold": (-1.0, 1.0), "temperature": (1e-12, float("inf")), "steps": (0, 10**6)}
"""Each parameter's closed range; ``steps`` is an integer."""


@register_stage("g-prune")
class GPrune(Stage):
    fixed_ratio = True
    statistic = "gprune"
    defaults = {"threshold": 0.5, "temperature": 0.03, "steps": 5}
    score_params = ("threshold", "temperature", "steps")

    @staticmethod
    def param_ok(key: str, value: Any) -> bool:
        """Whether ``value`` is a valid G-Prune ``key`` (a known name, in range)."""
        if key not in RANGES:
            return False
        low, high = RANGES[key]
        return is_number(value) and low <= value <= high and (key != "steps" or isinstance(value, int))

    def validate(self, params: dict, recipe: Any) -> None:
        for key, value in params.items():
            if key not in RANGES:
                raise RecipeError(f"pre-LLM stage 'g-prune': unknown parameter {short(key)} in pre_llm.params (threshold, temperature, steps)")
            if not self.param_ok(key, value):
                raise RecipeError(f"pre-LLM stage 'g-prune': pre_llm.params.{key}={short(value)} is out of range")

    def statistics_mismatch(self, recorded: dict, wanted: dict) -> str | None:
        wanted = self.resolve(wanted)
        if {key: recorded.get(key) for key in wanted} == wanted:
            return None
        held = json.dumps({key: recorded[key] for key in wanted if key in recorded}, sort_keys=True) if recorded else "unknown parameters"
        return f"the saved statistics hold G-Prune scores for {held}, not {json.dumps(wanted, sort_keys=True)}; recollect them"

    def resolve(self, params: dict) -> dict:
        return {key: params.get(key, default) for key, default in self.defaults.items()}

    def scores(self, view: Any, embeds: torch.Tensor | None, params: dict) -> torch.Tensor | None:
        if embeds is None:
            return None
        return prellm.gprune_scores(view_tokens(view, embeds), **self.resolve(params))

    def keep(self, scores: torch.Tensor, keep_ratio: float | None, grid: tuple[int, int] | None, params: dict) -> torch.Tensor:
        return prellm._topk_mask(scores, prellm.stage_count(keep_ratio, scores.shape[0]))

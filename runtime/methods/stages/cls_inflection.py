"""CLS-inflection: each image keeps the head of its patch–CLS similarity curve, cut at the knee.

Reads the family's ``"features"`` signal (the CLS and patch hidden states of the model's feature
layer). The count differs per image (the knee, found by ``params["inflection_detector"]``, one of
:data:`runtime.methods.detectors.DETECTORS`). Stage 2 *is* the in-LLM schedule: from layer
``stage2_layer`` on, the fraction ``stage2_ratio`` of the survivors stays, ranked by the
``text-mean`` scorer (:meth:`ClsInflection.stage2_counts`).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ... import prellm
from ...errors import RecipeError
from ...validation import is_number, short
from ..detectors import DETECTORS
from .base import Stage, register_stage

STAGE2_SCORER = "text-mean"
"""The scorer of stage 2 (the cut at ``stage2_layer``)."""


@register_stage("cls-inflection")
class ClsInflection(Stage):
    fixed_ratio = False
    signals = ("features",)
    statistic = "clssim"
    defaults = {"inflection_detector": "kneedle"}
    selection_params = ("inflection_detector",)
    own_schedule = True
    stage2_scorer = STAGE2_SCORER

    @staticmethod
    def stage2_counts(v: int, num_layers: int, layer: int, ratio: float) -> np.ndarray:
        """int32 ``[num_layers]``: ``v`` before ``layer``, ``round_half_up(ratio · v)`` from it on."""
        return np.array([v] * layer + [int(math.floor(ratio * v + 0.5))] * (num_layers - layer), dtype=np.int32)

    def validate(self, params: dict, recipe: Any) -> None:
        if set(params) - {"inflection_detector"} != {"stage2_layer", "stage2_ratio"}:
            raise RecipeError(f"pre-LLM stage 'cls-inflection': pre_llm.params must hold stage2_layer and stage2_ratio, got {short(sorted(params))}")
        if params.get("inflection_detector", "kneedle") not in DETECTORS:
            raise RecipeError(f"pre-LLM stage 'cls-inflection': pre_llm.params.inflection_detector must be {DETECTORS.choices()}, got {short(params['inflection_detector'])}")
        layer, ratio = params["stage2_layer"], params["stage2_ratio"]
        if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer < recipe.num_layers:
            raise RecipeError(f"pre-LLM stage 'cls-inflection': pre_llm.params.stage2_layer must be an integer in [1, {recipe.num_layers - 1}], got {short(layer)}")
        if not is_number(ratio) or not 0 <= ratio <= 1:
            raise RecipeError(f"pre-LLM stage 'cls-inflection': pre_llm.params.stage2_ratio must be a number in [0, 1], got {short(ratio)}")
        expected = self.stage2_counts(recipe.reference_visual_tokens, recipe.num_layers, layer, ratio)
        if not np.array_equal(recipe.keep_count, expected):
            raise RecipeError("pre-LLM stage 'cls-inflection': keep_count must be the stage-2 schedule (v before stage2_layer, round(stage2_ratio·v) after)")
        if recipe.scorer != STAGE2_SCORER:
            raise RecipeError(f"pre-LLM stage 'cls-inflection': stage 2 uses the {STAGE2_SCORER} scorer, but the recipe's scorer is {short(recipe.scorer)}")

    def describe(self, spec: dict) -> str:
        return "keeps each image's tokens up to the knee of its CLS-similarity curve"

    def resolve(self, params: dict) -> dict:
        params = {**self.defaults, **params}
        if params["inflection_detector"] not in DETECTORS:
            raise ValueError(f"inflection detector {params['inflection_detector']!r} is unknown; choose one of {', '.join(DETECTORS)}")
        return params

    def scores(self, view: Any, embeds: torch.Tensor | None, params: dict) -> torch.Tensor | None:
        return view.clssim

    def keep(self, scores: torch.Tensor, keep_ratio: float | None, grid: tuple[int, int] | None, params: dict) -> torch.Tensor:
        return prellm.inflection_keep(scores, params.get("inflection_detector", "kneedle"))

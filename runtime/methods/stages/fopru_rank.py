"""FoPru rank: the global top tokens by their significance in the vision encoder's attention.

Reads the family's ``"attention"`` signal: each patch's significance at the FoPru feature layer
(``params["feature_layer"]``, HF ``vision_feature_layer`` convention; default the model's). Each
view keeps its ``round_half_up(keep_ratio · n)`` most significant tokens.
"""
from __future__ import annotations

from typing import Any

import torch

from ... import prellm
from ...errors import RecipeError
from ...validation import short
from .base import Stage, register_stage


@register_stage("fopru-rank")
class FoPruRank(Stage):
    fixed_ratio = True
    signals = ("attention",)
    statistic = "fopru"
    score_params = ("feature_layer",)

    def validate(self, params: dict, recipe: Any) -> None:
        if set(params) - {"feature_layer"}:
            raise RecipeError(f"pre-LLM stage {self.name!r}: unexpected pre_llm.params {short(sorted(set(params) - {'feature_layer'}))} (only feature_layer)")
        layer = params.get("feature_layer", -1)
        if isinstance(layer, bool) or not isinstance(layer, int) or layer == 0:
            raise RecipeError(f"pre-LLM stage {self.name!r}: pre_llm.params.feature_layer must be a non-zero integer (vision_feature_layer convention), got {short(layer)}")

    def check_model(self, model: Any, params: dict) -> None:
        if "feature_layer" in params:
            from ...families import family_for

            family_for(model).resolve_feature_layer(model, params["feature_layer"], "the recipe's pre_llm feature_layer")

    def statistics_mismatch(self, recorded: dict, wanted: dict) -> str | None:
        layer = wanted.get("feature_layer")
        if layer is None or recorded.get("feature_layer") == layer:
            return None
        return (f"the saved statistics hold FoPru scores from vision feature layer {recorded.get('feature_layer', 'unknown')}, "
                f"not {layer} (hidden_states index); recollect them without --stats")

    def scores(self, view: Any, embeds: torch.Tensor | None, params: dict) -> torch.Tensor | None:
        return view.attention

    def keep(self, scores: torch.Tensor, keep_ratio: float | None, grid: tuple[int, int] | None, params: dict) -> torch.Tensor:
        return prellm._topk_mask(scores, prellm.stage_count(keep_ratio, scores.shape[0]))

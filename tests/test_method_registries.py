"""Method names are defined once, by the module that implements them; everything else asks the registry.

The CLI's choices are the registries' names; a stage registered by its module alone is accepted by
the recipe loader, the support check, the runtime and the CLI, and the stage interface lets a
stage write the kept tokens' input embeddings (the feature-producing form VisionZip needs).
"""
from __future__ import annotations

import pytest
import torch

from conftest import make_inputs
from recipe_compiler.search import SEARCHES
from runtime import Recipe, RecipeError
from runtime.families import model_fingerprint
from runtime.methods.detectors import DETECTORS
from runtime.methods.heads import HEAD_REDUCTIONS
from runtime.methods.scorers import SCORERS
from runtime.methods.stages import STAGES, Selection, Stage
from runtime.prellm import stage_count
from runtime.prellm_stage import supported_methods
from runtime.recipe import from_bytes


def _choices() -> dict:
    import click

    from recipe_compiler.cli import _compile_command

    return {param.name: list(param.type.choices) for param in _compile_command().params if isinstance(param.type, click.Choice)}


def test_cli_choices_are_the_registries_names():
    choices = _choices()
    assert choices["scorer"] == list(SCORERS) == ["fitprune", "text-mean", "last-token", "pdrop", "dart", "sparsevlm", "random"]
    assert choices["head_reduce"] == list(HEAD_REDUCTIONS) == ["max", "mean"]
    assert choices["search"] == list(SEARCHES) == ["optimal", "gsearch", "psigmoid", "fitprune", "fastv", "pdrop", "dart", "sparsevlm"]
    assert choices["pre_llm"] == ["none", *STAGES, "auto"] == ["none", "g-prune", "fopru-rank", "fopru-row", "cls-inflection", "divprune", "visionzip", "vtc-cls", "prumerge-plus", "random", "auto"]
    assert choices["inflection_detector"] == list(DETECTORS) == ["kneedle", "max-curvature"]


def test_a_name_is_registered_once():
    with pytest.raises(ValueError, match="registered twice"):
        STAGES.register("g-prune", STAGES["g-prune"])
    with pytest.raises(KeyError, match="unknown scorer 'nope'; choose one of fitprune, text-mean, last-token, pdrop, dart, sparsevlm, random"):
        SCORERS["nope"]


class ZeroMerge(Stage):
    """A throwaway feature-writing stage: keeps the first ``round_half_up(r·n)`` tokens of each view
    and writes zeros as their input embeddings."""

    name = statistic = "test-zero-merge"

    def scores(self, view, embeds, params):
        return -torch.arange(view.positions.numel(), dtype=torch.float32)

    def select(self, view, embeds, keep_ratio, params):
        keep = torch.zeros(view.positions.numel(), dtype=torch.bool)
        keep[: stage_count(keep_ratio, keep.numel())] = True
        return Selection(keep, features=torch.zeros(int(keep.sum()), embeds.shape[-1]))


@pytest.fixture
def zero_merge():
    STAGES.register(ZeroMerge.name, ZeroMerge())
    try:
        yield STAGES["test-zero-merge"]
    finally:
        STAGES.unregister("test-zero-merge")


def test_a_stage_registered_by_its_module_alone_runs_everywhere(zero_merge, tiny, calibration):
    model = tiny.model
    fp = model_fingerprint(model)
    assert "test-zero-merge" in supported_methods(model)  # it reads no vision signal: every family can run it
    assert "test-zero-merge" in _choices()["pre_llm"]
    spec = {"method": "test-zero-merge", "keep_ratio": 0.5, "params": {}}
    recipe = from_bytes(Recipe.keep_all(fp, pre_llm=spec).to_bytes())  # the loader validates it by the registry
    with pytest.raises(RecipeError, match="unexpected pre_llm.params"):
        Recipe.keep_all(fp, pre_llm={**spec, "params": {"alpha": 1}})

    seen = {}

    def record(module, args, kwargs):  # runs after the pruner's own pre-hook: sees what layer 0 gets
        seen["hidden"] = (args[0] if args else kwargs["hidden_states"]).clone()

    inputs = make_inputs(tiny, calibration.samples[:1])
    with recipe.apply(model) as handle, torch.no_grad():
        probe = model.model.language_model.layers[0].register_forward_pre_hook(record, with_kwargs=True)
        try:
            model(**inputs, use_cache=False, logits_to_keep=1)
        finally:
            probe.remove()
        request = handle.last_request
    kept = stage_count(0.5, 576)
    assert request.visual_per_layer[0].tolist() == [kept]
    zero = (seen["hidden"][0] == 0).all(dim=-1)  # rows of layer 0's input: the stage's features are zeros
    prompt_positions = request.kept[0][0][0]  # each row's position in the prompt
    first = torch.nonzero(inputs["input_ids"][0] == tiny.image_token_id).flatten()[:kept]
    assert sorted(prompt_positions[zero].tolist()) == first.tolist() == request.selection[0][0].tolist()

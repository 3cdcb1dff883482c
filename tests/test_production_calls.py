"""The calls a user makes first, as they make them (regressions of defects found from outside).

* A recipe with a pre-LLM stage on one unpadded request (``generate`` drops an all-ones attention
  mask, so the decode mask is rebuilt without a 2D mask): it crashed at the first decode step.
* ``recipe-eval`` on such a recipe with one sample.
* A ``labels`` forward on a patched model: one clear error saying what to do.
* ``copy.deepcopy`` of a patched model: a clean, unpatched copy.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from conftest import make_inputs, run_cli
from runtime import PruningUnsupportedError, Recipe, load
from runtime.families import model_fingerprint

GREEDY = dict(max_new_tokens=4, do_sample=False)


@pytest.fixture(scope="module")
def stage_recipe_file(tmp_path_factory):
    from recipe_compiler.cli import compile_main

    out = tmp_path_factory.mktemp("recipes") / "gp.safetensors"
    code = compile_main(["--budget", "0.45", "--pre-llm", "g-prune", "--pre-llm-ratio", "0.5", "--samples", "2",
                         "--quiet", "-o", str(out)])
    assert code == 0
    return out


def test_a_pre_llm_recipe_generates_for_one_unpadded_request(tiny, calibration, stage_recipe_file):
    model = tiny.model
    inputs = make_inputs(tiny, calibration.samples[:1])
    assert bool(inputs["attention_mask"].all()), "batch 1 has no padding"
    with load(stage_recipe_file).apply(model) as handle, torch.no_grad():
        out = model.generate(**inputs, **GREEDY)
        request = handle.last_request
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4
    assert request is not None and int(request.visual_per_layer[0][0]) == 288  # half of 576 enter layer 0


def test_recipe_eval_runs_a_pre_llm_recipe_on_one_sample(capsys, stage_recipe_file):
    from recipe_compiler.evaluate import main

    code, out, err = run_cli(capsys, ["--recipe", str(stage_recipe_file), "--samples", "1", "--new-tokens", "3", "--repeats", "1"], main=main)
    assert code == 0, err
    assert "gp" in out


def test_an_auto_stage_recipe_generates_for_one_unpadded_request(tiny, calibration, tmp_path, capsys):
    out = tmp_path / "auto.safetensors"
    code, _, err = run_cli(capsys, ["--budget", "0.3", "--pre-llm", "auto", "--samples", "2", "--quiet", "-o", str(out)])
    assert code == 0, err
    recipe = load(out)
    inputs = make_inputs(tiny, calibration.samples[:1])
    with recipe.apply(tiny.model), torch.no_grad():
        generated = tiny.model.generate(**inputs, **GREEDY)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 4


def _pruning(model) -> Recipe:
    fp = model_fingerprint(model)
    v = fp["visual_tokens"]
    return Recipe(keep_count=np.array([v, v, v // 2, v // 2, v // 4, v // 4, v // 8, v // 8]), scorer="fitprune", fingerprint=fp)


def test_a_labels_forward_on_a_patched_model_says_to_remove_the_handle(tiny, calibration):
    model = tiny.model
    inputs = make_inputs(tiny, calibration.samples[:2])
    labels = inputs["input_ids"].clone()
    with _pruning(model).apply(model), torch.no_grad():
        with pytest.raises(PruningUnsupportedError, match=r"labels.*remove\(\)"):
            model(**inputs, labels=labels)
    with torch.no_grad():  # the unpatched model computes the loss as usual
        assert torch.isfinite(model(**inputs, labels=labels).loss)


def _hook_count(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_deepcopy_of_a_patched_model_is_a_clean_unpatched_copy(calibration):
    from recipe_compiler.models import build_tiny_llava

    loaded = build_tiny_llava(seed=0)
    model = loaded.model
    inputs = make_inputs(loaded, calibration.samples[:2])
    with torch.no_grad():
        reference = model(**inputs).logits
        before = _hook_count(model)  # transformers adds its own output-capturing hooks on the first forward
        handle = _pruning(model).apply(model)
        pruned = model(**inputs).logits
        clone = copy.deepcopy(model)
        assert _hook_count(clone) == before and getattr(clone, "_recipe_runtime_handle", None) is None
        assert clone.config.text_config._attn_implementation == "sdpa"
        assert torch.equal(clone(**inputs).logits, reference), "the copy must run as the unpatched model"
        assert torch.equal(model(**inputs).logits, pruned), "copying must not disturb the patched original"
        handle.remove()
        with _pruning(clone).apply(clone):  # the copy takes a recipe like any stock model
            assert torch.equal(clone(**inputs).logits, pruned)
        assert torch.equal(clone(**inputs).logits, reference) and _hook_count(clone) == before

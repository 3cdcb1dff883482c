"""The benchmark's oracle prefill computes exactly what the pruned runtime computes."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.append(str(Path(__file__).resolve().parents[1] / "bench"))  # after the packages: bench/runtime.py is a script

from oracle import capture_schedule, oracle_language_model  # noqa: E402

from recipe_compiler.calibration import load_calibration  # noqa: E402
from recipe_compiler.collect import collect_statistics, model_inputs  # noqa: E402
from recipe_compiler.compile import CompileConfig, compile_recipe  # noqa: E402
from recipe_compiler.models import REGISTRY, build_random  # noqa: E402


@pytest.mark.parametrize("fuse_probe", [False, True], ids=["stock-kernel", "fused-probe"])
@pytest.mark.parametrize("alias, batch", [("tiny-llava", 1), ("tiny-qwen2-vl", 2)])
def test_oracle_matches_pruned_prefill(alias, batch, fuse_probe):
    loaded = build_random(REGISTRY[alias])
    calibration = load_calibration(samples=2)
    stats = collect_statistics(loaded.model, loaded.processor, calibration, format_prompt=loaded.format_prompt)
    recipe = compile_recipe(loaded.model, loaded.processor, calibration, CompileConfig(0.45),
                            format_prompt=loaded.format_prompt, statistics=stats).recipe
    inputs = model_inputs(loaded.model, loaded.processor, load_calibration(split="heldout").samples[:batch], loaded.format_prompt)
    schedule, pruned = capture_schedule(loaded.model, recipe, inputs, fuse_probe=fuse_probe)
    with oracle_language_model(loaded.model, schedule), torch.no_grad():
        oracle = loaded.model(**inputs, use_cache=True, logits_to_keep=1)
    if fuse_probe:  # the probed layers' attention is P·V from the probe's rows: SDPA's to float rounding
        torch.testing.assert_close(oracle.logits, pruned.logits, rtol=1e-4, atol=1e-4)
    else:
        assert torch.equal(oracle.logits, pruned.logits)
    lengths = lambda out: [layer.keys.shape[2] for layer in out.past_key_values.layers]  # noqa: E731
    assert lengths(oracle) == lengths(pruned)
    assert min(lengths(oracle)) < inputs["input_ids"].shape[1]  # it did prune
    assert "forward" not in vars(loaded.model.model.language_model)  # the stock forward is back

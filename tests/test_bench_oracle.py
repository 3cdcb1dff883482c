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


def test_rotated_interleaves_rounds_in_shuffled_orders():
    from common import rotated

    names = ["unpruned", "pruned", "oracle"]

    def run(**options):
        """The candidates' calls in order, the contexts entered, and rotated's result."""
        calls: list = []
        entered: list = []

        def context(name):
            class Context:
                def __enter__(self):
                    entered.append(name)

                def __exit__(self, *exc):
                    return False
            return Context

        result = rotated({name: ((lambda n=name: calls.append(n)), context(name)) for name in names}, **options)
        return calls, entered, result

    calls, entered, result = run(repeats=12)
    rounds = [calls[i:i + 3] for i in range(3, len(calls), 3)]  # after one warm-up call each
    assert calls[:3] == names and len(rounds) == 12
    assert all(sorted(r) == sorted(names) for r in rounds)  # every round runs each candidate once
    assert len({tuple(r) for r in rounds}) > 1  # ... in orders that change from round to round
    assert entered == calls  # each call inside its own context
    assert all(len(result[name]["samples_ms"]) == 12 for name in names)
    assert run(repeats=12)[0] == calls  # seeded: the same orders on a re-run
    assert run(repeats=4, seed=None)[0] == names * 5


def test_paired_ratio_median_and_interval():
    from common import paired_ratio

    oracle = [100.0, 102.0, 98.0, 150.0, 101.0, 99.0, 100.0]
    pruned = [102.0, 104.0, 100.0, 153.0, 103.0, 101.0, 102.0]  # one slow round hits both
    ratio, (low, high) = paired_ratio(oracle, pruned)
    assert ratio == pytest.approx(sorted(o / p for o, p in zip(oracle, pruned))[3])
    assert low <= ratio <= high and high - low < 0.01

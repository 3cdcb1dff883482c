"""Calibration probes in the model's dtype (``collect_statistics(probe_dtype="model")``).

By default the probes multiply ``q·kᵀ`` in float32 whatever the model's dtype; ``"model"`` keeps a
bf16 model's products in bf16 (softmax and sums stay float32). On an fp32 model the two are the same
computation; on a bf16 model the statistics move by about 1e-4 and the searched schedule stays.
"""
from __future__ import annotations

import numpy as np
import pytest

from recipe_compiler.collect import collect_statistics


def _stats(loaded, calibration, probe_dtype):
    return collect_statistics(loaded.model, loaded.processor, calibration, format_prompt=loaded.format_prompt, probe_dtype=probe_dtype)


def test_an_fp32_model_gives_identical_statistics_either_way(tiny, calibration):
    a, b = _stats(tiny, calibration, None), _stats(tiny, calibration, "model")
    for name in ("cross", "self_attn", "last"):
        assert np.array_equal(getattr(a, name), getattr(b, name), equal_nan=True)


def test_a_bf16_model_s_own_dtype_moves_the_statistics_little_and_keeps_the_schedule(calibration):
    from recipe_compiler.compile import CompileConfig, compile_recipe
    from recipe_compiler.models import load_model

    loaded = load_model("tiny-llava", dtype="bfloat16")
    a, b = _stats(loaded, calibration, None), _stats(loaded, calibration, "model")
    for name in ("cross", "self_attn", "last"):
        x, y = getattr(a, name), getattr(b, name)
        finite = np.isfinite(x)
        assert np.array_equal(finite, np.isfinite(y))
        assert np.abs(x[finite] - y[finite]).max() <= 1e-2 * np.abs(x[finite]).max(), name
    keep = [compile_recipe(loaded.model, loaded.processor, calibration, CompileConfig(0.45, pre_llm="none"),
                           format_prompt=loaded.format_prompt, statistics=s).recipe.keep_count for s in (a, b)]
    assert np.array_equal(*keep)


def test_an_unknown_probe_dtype_is_refused(tiny, calibration):
    with pytest.raises(ValueError, match="probe_dtype must be None"):
        _stats(tiny, calibration, "bfloat16")

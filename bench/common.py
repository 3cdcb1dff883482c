"""Shared bench helpers: the mid-size architecture, the machine's name, timing, JSON output."""
from __future__ import annotations

import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from recipe_compiler.families import FAMILIES  # noqa: E402
from recipe_compiler.families.llava import LLAVA_15_PROMPT_TEMPLATE  # noqa: E402
from recipe_compiler.models import REGISTRY, ModelSpec  # noqa: E402


def mid_spec() -> ModelSpec:
    """A mid-size random LLaVA: LLaVA-1.5's 576 visual tokens per 336-px image, a ~85M-parameter
    12-layer Llama (hidden 768), and a deliberately small CLIP tower so the language model, where
    pruning acts, dominates prefill time on a CPU."""
    config = {
        "model_type": "llava",
        "vision_config": {
            "model_type": "clip_vision_model", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 336, "patch_size": 14,
            "projection_dim": 64, "hidden_act": "quick_gelu",
        },
        "text_config": {
            "model_type": "llama", "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12,
            "num_attention_heads": 12, "num_key_value_heads": 12, "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5, "vocab_size": 32064, "pad_token_id": 32001,
        },
        "image_token_index": 32000, "pad_token_id": 32001, "projector_hidden_act": "gelu",
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "image_seq_length": 576,
    }
    return ModelSpec(alias="bench-mid", hub_id=None, config=config, prompt_template=LLAVA_15_PROMPT_TEMPLATE,
                     description="mid-size random LLaVA for benchmarks (12x768 Llama, 576 visual tokens)")


MID_TEXT = {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 12,
            "num_key_value_heads": 12}


def mid_family_spec(tiny_alias: str) -> ModelSpec:
    """A family's built-in tiny model (its vision tower and image layout) with the mid-size LM."""
    import dataclasses

    tiny = REGISTRY[tiny_alias]
    config = FAMILIES[tiny.config["model_type"]].resize_language_model(tiny.config, MID_TEXT)
    return dataclasses.replace(tiny, alias=f"mid-{tiny_alias.removeprefix('tiny-')}", config=config,
                               description=f"{tiny.description}; mid-size 12x768 LM for benchmarks")


def spec_for(name: str) -> ModelSpec:
    """``mid`` (the LLaVA-1.5 layout with the mid-size LM), ``mid-<f>`` (built-in ``tiny-<f>`` with
    the mid-size LM) or a registry alias."""
    if name == "mid":
        return mid_spec()
    tiny = "tiny-" + name.lower().removeprefix("mid-")
    if name.lower() != tiny and tiny in REGISTRY:
        return mid_family_spec(tiny)
    if name.lower() not in REGISTRY:
        mids = ", ".join(f"'mid-{alias.removeprefix('tiny-')}'" for alias in sorted(REGISTRY) if alias.startswith("tiny-"))
        raise SystemExit(f"unknown model {name!r}: use 'mid', {mids} or one of {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name.lower()]


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def timed(fn, repeats: int, warmup: int = 1, device: str = "cpu") -> dict:
    """Median and spread of ``fn()`` wall time in milliseconds."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) * 1000)
    return {"median_ms": statistics.median(samples), "min_ms": min(samples), "max_ms": max(samples), "repeats": repeats}


def emit(result: dict, out: str | None) -> None:
    text = json.dumps(result, indent=2, sort_keys=True)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")


def paired(baseline, candidate, setup, teardown, repeats: int, device: str = "cpu") -> tuple[dict, dict]:
    """Time ``baseline`` and ``candidate`` alternately (A, B, A, B, …) so drift hits both alike.

    ``setup``/``teardown`` run around each candidate call, outside the timed region (e.g. applying
    and removing a recipe). Returns the two timing summaries as :func:`timed` does.
    """
    def once(fn) -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1000

    baseline()
    setup(); candidate(); teardown()  # warm-up both paths
    a, b = [], []
    for _ in range(repeats):
        a.append(once(baseline))
        setup()
        b.append(once(candidate))
        teardown()
    summary = lambda xs: {"median_ms": statistics.median(xs), "min_ms": min(xs), "max_ms": max(xs), "repeats": repeats}  # noqa: E731
    return summary(a), summary(b)


def rotated(candidates: dict, repeats: int, device: str = "cpu", seed: int | None = 0) -> dict:
    """Time several candidates in interleaved rounds so drift and load hit all alike.

    Every round runs each candidate once, back to back; with ``seed`` (the default, 0) each round's
    order is a fresh random permutation (randomized multiple interleaved trials), so that no
    candidate always follows the same one (the cache and allocator state a long unpruned run leaves
    behind, say); ``seed=None`` keeps the given order (A, B, C, A, B, C, …).
    ``candidates`` maps a name to ``(fn, context)``: ``context()`` returns a context manager
    entered around each call, outside the timed region (applying a recipe, swapping in the oracle).
    One untimed warm-up call each. Returns the name -> summary as :func:`timed` does, plus the
    samples in round order (``samples_ms``: round ``i`` of every candidate ran back to back).
    """
    def once(fn, context) -> float:
        with context():
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            return (time.perf_counter() - start) * 1000

    for fn, context in candidates.values():
        once(fn, context)
    rng = random.Random(seed) if seed is not None else None
    samples: dict = {name: [] for name in candidates}
    for _ in range(repeats):
        order = list(candidates)
        if rng is not None:
            rng.shuffle(order)
        for name in order:
            fn, context = candidates[name]
            samples[name].append(once(fn, context))
    return {name: {"median_ms": statistics.median(xs), "min_ms": min(xs), "max_ms": max(xs), "repeats": repeats,
                   "samples_ms": xs}
            for name, xs in samples.items()}


def paired_ratio(numerator: list, denominator: list, resamples: int = 2000, seed: int = 0) -> tuple[float, tuple[float, float]]:
    """Median over rounds of ``numerator[i] / denominator[i]``, and its 95 % bootstrap interval.

    The rounds of :func:`rotated` ran their candidates back to back, so a per-round ratio cancels
    whatever the machine's speed did between rounds; the interval (percentiles of the median over
    ``resamples`` resamplings of the rounds, seeded) says how far the figure would move on a re-run.
    """
    ratios = np.asarray(numerator, dtype=np.float64) / np.asarray(denominator, dtype=np.float64)
    rng = np.random.default_rng(seed)
    medians = np.median(ratios[rng.integers(0, len(ratios), size=(resamples, len(ratios)))], axis=1)
    low, high = np.percentile(medians, [2.5, 97.5])
    return float(np.median(ratios)), (float(low), float(high))


def load_average() -> list[float]:
    """The 1/5/15-minute load averages (a shared machine's timings are only as steady as its load)."""
    return [round(x, 2) for x in os.getloadavg()]


def prepare(model_name: str, samples: int, batch: int, device: str, dtype: str, head_reduce: str = "max"):
    """What every runtime bench starts from: a random model of ``model_name``, ``samples``
    calibration samples and their statistics (heads combined by ``head_reduce``, the recipes'
    scorer's), and ``batch`` held-out prompts as model inputs."""
    from recipe_compiler.calibration import load_calibration
    from recipe_compiler.collect import collect_statistics, model_inputs
    from recipe_compiler.models import build_random

    loaded = build_random(spec_for(model_name), device=device, dtype=dtype)
    calibration = load_calibration(samples=samples)
    statistics = collect_statistics(loaded.model, loaded.processor, calibration, format_prompt=loaded.format_prompt,
                                    head_reduce=head_reduce)
    prompts = load_calibration(split="heldout").samples[:batch]
    inputs = model_inputs(loaded.model, loaded.processor, prompts, loaded.format_prompt)
    return loaded, calibration, statistics, inputs

"""Shared fixtures: tiny real architectures built from configs, the shipped calibration data."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the suite also runs from a plain checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

# Tiny models are made of tiny matrix products: one thread runs them as fast as two on an idle
# machine and several times faster on a busy one (OpenMP threads spin while they wait for a core).
torch.set_num_threads(int(os.environ.get("RECIPE_TEST_THREADS", "1")))
os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("RECIPE_TEST_THREADS", "1"))  # CLI subprocesses too

# tests/vllm runs in its own environment (scripts/vllm-env.sh builds it; .ci/run runs it there): where
# vLLM is not installed (the main environment) it is neither collected nor imported.
# (This folder is on sys.path, so tests/vllm itself is a namespace package named vllm: it has no origin.)
_vllm = importlib.util.find_spec("vllm")
collect_ignore = [] if _vllm is not None and _vllm.origin is not None else ["vllm"]


@pytest.fixture(scope="session")
def tiny():
    """tiny-llava with SDPA attention (576 visual tokens per image, 8 layers, GQA)."""
    from recipe_compiler.models import build_tiny_llava

    return build_tiny_llava(seed=0, attn_implementation="sdpa")


@pytest.fixture(scope="session")
def tiny_eager():
    from recipe_compiler.models import build_tiny_llava

    return build_tiny_llava(seed=0, attn_implementation="eager")


@pytest.fixture(scope="session")
def calibration():
    from recipe_compiler.calibration import load_calibration

    return load_calibration(samples=6)


def make_inputs(loaded, samples, prompts=None):
    """Processor inputs for samples (left-padded when prompts differ in length)."""
    from recipe_compiler.calibration import load_image

    prompts = prompts or [s.prompt for s in samples]
    return loaded.processor(
        images=[load_image(s) for s in samples],
        text=[loaded.format_prompt(p) for p in prompts],
        return_tensors="pt",
        padding=True,
    )


def run_cli(capsys, argv, main=None):
    """Run a console entry point in-process: ``(exit code, stdout, stderr)``; default ``recipe-compile``.

    A usage error (click: unknown option, bad value) raises SystemExit(2), so that counts as an exit code too.
    """
    if main is None:
        from recipe_compiler.cli import compile_main as main
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def offline_hub(monkeypatch, cache) -> Path:
    """huggingface_hub offline against the cache folder ``cache`` (created), for the rest of the test.

    huggingface_hub reads ``HF_HUB_OFFLINE`` and ``HF_HUB_CACHE`` once, when it is imported: set the
    variables (for subprocesses and for a first import) and its constants (for this process).
    """
    import huggingface_hub.constants as constants

    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache

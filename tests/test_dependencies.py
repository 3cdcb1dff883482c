"""The serving side stays lean: importing and applying with `runtime` pulls in nothing heavy."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("scipy", "click", "tqdm", "recipe_compiler", "matplotlib")  # allowed in recipe_compiler, never in runtime
SERVING = ("vllm", "transformers")  # imported lazily: only when a model is patched or vLLM loads the plugin


def _loaded_after(statement: str) -> list[str]:
    code = f"import sys, json; {statement}; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(out.stdout)


def test_import_runtime_loads_no_compiler_dependencies():
    assert _loaded_after("import runtime; from runtime import load, Recipe") == []


def test_click_is_the_compilers_dependency_never_the_runtimes():
    # The CLI is click (declared in pyproject); the serving side must not pull it in.
    tomllib = pytest.importorskip("tomllib")

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.replace(" ", "").startswith("click>=") for d in declared), declared
    assert "click" in _loaded_after("from recipe_compiler.cli import _compile_command; _compile_command()")
    assert "click" not in _loaded_after("import runtime, runtime.pruner, runtime.presets; from runtime import load")


def test_applying_recipes_adds_nothing_beyond_torch_itself():
    # torch 2.13 imports tqdm on its own; the runtime must not add anything to that.
    baseline = set(_loaded_after("import torch, numpy"))
    used = set(_loaded_after("import runtime.pruner, runtime.scoring, runtime.attention, runtime.families, runtime.methods.stages"))
    assert used <= baseline, sorted(used - baseline)


def test_runtime_source_never_imports_the_compiler():
    for path in (ROOT / "runtime").rglob("*.py"):
        text = path.read_text()
        for name in HEAVY:
            assert f"import {name}" not in text and f"from {name}" not in text, f"{path.name} imports {name}"


def test_import_runtime_and_its_vllm_helpers_loads_neither_vllm_nor_transformers():
    code = (f"import sys, json; import runtime, runtime.vllm; from runtime.vllm import overrides, register; "
            f"print(json.dumps([m for m in {SERVING!r} if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert json.loads(out.stdout) == []


def test_only_the_vllm_model_module_imports_vllm_at_module_level():
    for path in (ROOT / "runtime").glob("*.py"):
        top_level = [line for line in path.read_text().splitlines() if line.startswith(("import vllm", "from vllm"))]
        assert not top_level or path.name == "vllm_models.py", f"{path.name} imports vLLM at module level"


def test_the_hub_helpers_import_huggingface_hub_only_when_a_hub_id_is_used():
    code = ("import sys, json; import runtime, runtime.hub; from runtime import load; "
            "print(json.dumps('huggingface_hub' in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert json.loads(out.stdout) is False


def test_both_packages_ship_py_typed():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for package in ("runtime", "recipe_compiler"):
        assert (ROOT / package / "py.typed").is_file(), package
        assert "py.typed" in package_data[package], f"{package}/py.typed is not package data"


def test_transformers_outside_the_tested_range_warns_at_import_inside_it_does_not():
    import warnings

    from runtime.compat import SUPPORTED_RANGE, TESTED_TRANSFORMERS, untested_transformers, warn_if_untested

    low, high = TESTED_TRANSFORMERS
    assert untested_transformers(f"{low[0]}.{low[1]}.0") is None and untested_transformers(f"{high[0]}.{high[1]}.3") is None
    for outside in (f"{low[0]}.{low[1] - 1}.2", f"{high[0]}.{high[1] + 1}.0", f"{high[0] + 1}.0.0.dev0"):
        message = untested_transformers(outside)
        assert message is not None and f"transformers {outside} is outside the tested range" in message and "\n" not in message
        with pytest.warns(RuntimeWarning, match="outside the tested range"):
            warn_if_untested(outside)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_untested("5.23.0")
    tomllib = pytest.importorskip("tomllib")
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"transformers{SUPPORTED_RANGE}" in declared  # runtime.compat and pyproject.toml say the same
    # And at import: the installed (tested) transformers gives no warning, even as an error.
    subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", "import runtime"], cwd=ROOT, check=True)

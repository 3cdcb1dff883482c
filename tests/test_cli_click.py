"""The click CLI as users call it: the group, ``python -m``, ``--version``, grouped ``--help``, ``--json``, bash completion."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _script(name: str) -> str:
    path = BIN / name
    assert path.exists(), f"console script {name} is not installed next to {sys.executable}; pip install -e ."
    return str(path)


def _run(command: list[str], env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env={**os.environ, **(env or {})}, timeout=600)


@pytest.mark.parametrize("command", [["recipe-compiler"], ["recipe-compile"], ["recipe-inspect"], ["recipe-eval"],
                                     ["recipe-compiler", "compile"]])
def test_every_command_prints_the_installed_version(command):
    from importlib.metadata import version

    result = _run([_script(command[0]), *command[1:], "--version"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(version("recipe-compiler")) and result.stderr == ""


def test_compile_help_groups_the_options_and_ends_with_examples(capsys):
    from recipe_compiler.search import SEARCHES

    code, out, _ = run_cli(capsys, ["--help"])
    assert code == 0
    headings = [line for line in out.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    assert headings[:7] == ["General:", "Model:", "Calibration:", "Search:", "Pre-LLM stage:", "Execution:", "Output:"]
    assert headings[-1] == "Examples:" and "recipe-compile --model tiny-llava --budget 0.45 -o r.safetensors" in out
    search = out[out.index("Search:"):out.index("Pre-LLM stage:")]
    assert "--search SEARCH" in search and all(name in " ".join(search.split()) for name in SEARCHES.names())


def test_choices_are_the_registries_own(capsys, tmp_path):
    """A method registered at run time is a valid --search / --pre-llm at once: the CLI reads the registries."""
    from recipe_compiler.cli import _compile_command
    from recipe_compiler.search import SEARCHES
    from runtime.methods.stages import STAGES

    options = {p.name: p for p in _compile_command().params}
    assert options["search"].type.choices == tuple(SEARCHES.names())
    assert set(STAGES) < set(options["pre_llm"].type.choices)
    code, _, err = run_cli(capsys, ["--budget", "0.5", "-o", str(tmp_path / "r.safetensors"), "--search", "nope"])
    assert code == 2 and "'nope' is not one of" in err and all(name in err for name in SEARCHES.names())
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "r.safetensors").exists()


@pytest.mark.parametrize("argv, fragment", [
    (["--budget", "1.5"], "budget must be in (0, 1]"),
    (["--budget", "nan"], "budget must be in (0, 1]"),
    (["--budget", "0.5", "--samples", "0"], "0 is not in the range x>=1"),
    (["--budget", "0.5", "--dtype", "float8"], "'float8' is not one of"),
    (["--budget", "0.5", "--pre-llm-ratio", "1.2"], "1.2 is not in the range 0<x<=1"),
    (["--budget", "0.5", "--device-map", "everywhere"], "device map must be one of auto"),
    (["--budget", "0.5", "--no-such-option"], "No such option '--no-such-option'"),
    (["-o", "OUT"], "Missing option '--budget'"),
])
def test_usage_errors_are_one_line_exit_2_no_file_and_no_model_time(argv, fragment, tmp_path, capsys, monkeypatch):
    import recipe_compiler.models as models

    monkeypatch.setattr(models, "prepare_model", lambda *a, **k: pytest.fail("the model was prepared before the bad option was refused"))
    out = tmp_path / "r.safetensors"
    argv = [str(out) if a == "OUT" else a for a in argv] + ([] if "-o" in argv else ["-o", str(out)])
    code, stdout, err = run_cli(capsys, argv)
    assert code == 2 and stdout == ""
    assert err.startswith("recipe-compile: error: ") and fragment in err and err.rstrip().endswith("(see recipe-compile --help)")
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_dtype_keeps_its_spellings(capsys, tmp_path):
    from recipe_compiler.cli import _compile_command

    dtype = next(p for p in _compile_command().params if p.name == "dtype")
    assert [dtype.type.convert(v, dtype, None) for v in ("bf16", "Torch.Float16", " fp32")] == ["bf16", "float16", "fp32"]


def test_python_m_recipe_compiler_compiles_with_json_summary_and_the_group_inspects_it(tmp_path):
    out = tmp_path / "r.safetensors"
    result = _run([sys.executable, "-m", "recipe_compiler", "compile", "--budget", "0.45", "--samples", "4", "--quiet", "-o", str(out), "--json"])
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)  # the whole of stdout is one JSON object
    assert summary["budget"] == 0.45 and summary["flops_fraction"] <= 0.45 * (1 + 1e-9) and summary["output"] == str(out)
    assert set(summary["seconds"]) >= {"load", "calibrate", "search", "verify", "write"} and 0 < summary["visual_tokens"] <= 576
    from runtime import load

    assert load(out).provenance["flops_fraction"] == pytest.approx(summary["flops_fraction"])
    shown = _run([_script("recipe-compiler"), "inspect", str(out), "--json"])
    assert shown.returncode == 0 and json.loads(shown.stdout)["provenance"]["budget"] == 0.45


def test_python_m_usage_error_names_the_subcommand():
    result = _run([sys.executable, "-m", "recipe_compiler", "compile", "--budget", "1.5", "-o", "never.safetensors"])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == ("python -m recipe_compiler compile: error: Invalid value for '--budget': budget must be in (0, 1] "
                                     "(the fraction of unpruned prefill FLOPs to spend), got 1.5 (see python -m recipe_compiler compile --help)")
    assert not (ROOT / "never.safetensors").exists()


def test_bash_completion_script_and_a_registry_choice_completes(tmp_path):
    script = _run([_script("recipe-compiler")], env={"_RECIPE_COMPILER_COMPLETE": "bash_source"})
    assert script.returncode == 0 and "_recipe_compiler_completion()" in script.stdout
    assert "complete -o nosort -F _recipe_compiler_completion recipe-compiler" in script.stdout
    words = {"COMP_WORDS": "recipe-compiler compile --search f", "COMP_CWORD": "3", "_RECIPE_COMPILER_COMPLETE": "bash_complete"}
    done = _run([_script("recipe-compiler")], env=words)
    assert done.returncode == 0 and sorted(done.stdout.split()) == ["plain,fastv", "plain,fitprune"]
    words = {"COMP_WORDS": "recipe-compile --model tiny-qwen", "COMP_CWORD": "2", "_RECIPE_COMPILE_COMPLETE": "bash_complete"}
    aliases = _run([_script("recipe-compile")], env=words)
    assert aliases.returncode == 0 and "plain,tiny-qwen2-vl" in aliases.stdout.split()
    # And bash itself, with the script sourced, completes the same word.
    bash = f'source <(_RECIPE_COMPILER_COMPLETE=bash_source {_script("recipe-compiler")}); ' \
           f'COMP_WORDS=(recipe-compiler compile --pre-llm vision); COMP_CWORD=3; _recipe_compiler_completion {_script("recipe-compiler")}; echo "${{COMPREPLY[@]}}"'
    shell = _run(["bash", "-c", bash])
    assert shell.returncode == 0 and shell.stdout.split() == ["visionzip"], shell.stderr

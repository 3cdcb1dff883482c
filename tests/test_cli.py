"""recipe-compile / recipe-inspect end to end on tiny-llava, and every bad input a user can give."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli
from recipe_compiler.cli import inspect_main
from runtime import load

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--model", "tiny-llava", "--samples", "6", "--quiet"]


_run = run_cli


def test_console_script_compiles_tiny_llava_and_prints_one_summary_line(tmp_path):
    script = Path(sys.executable).with_name("recipe-compile")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "recipe_compiler.cli"]
    out = tmp_path / "r.safetensors"
    result = subprocess.run(
        command + ["--model", "tiny-llava", "--budget", "0.45", "-o", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    for part in ("budget 0.45", "flops 0.4", "visual tokens", "divergence", "time load", "calibrate", "search", "verify"):
        assert part in lines[0]
    recipe = load(out)
    assert recipe.provenance["flops_fraction"] <= 0.45 * (1 + 1e-9)
    assert recipe.provenance["budget"] == 0.45


def test_identical_inputs_give_identical_bytes_and_stats_reuse_matches(tmp_path, capsys):
    first, second, reused = (tmp_path / f"{n}.safetensors" for n in ("a", "b", "c"))
    stats = tmp_path / "stats.safetensors"
    assert _run(capsys, FAST + ["--budget", "0.5", "-o", str(first), "--save-stats", str(stats)])[0] == 0
    assert _run(capsys, FAST + ["--budget", "0.5", "-o", str(second)])[0] == 0
    assert _run(capsys, FAST + ["--budget", "0.5", "-o", str(reused), "--stats", str(stats)])[0] == 0
    assert first.read_bytes() == second.read_bytes() == reused.read_bytes()


def test_fitprune_search_from_the_cli_meets_the_budget(tmp_path, capsys):
    out = tmp_path / "fp.safetensors"
    code, stdout, err = _run(capsys, FAST + ["--budget", "0.6", "--search", "fitprune", "-o", str(out)])
    assert code == 0, err
    recipe = load(out)
    assert recipe.provenance["search"] == "fitprune" and 0 <= recipe.provenance["search_params"]["alpha"] <= 1
    assert recipe.provenance["flops_fraction"] <= 0.6 * (1 + 1e-9)


def test_inspect_prints_schedule_and_provenance(tmp_path, capsys):
    out = tmp_path / "r.safetensors"
    assert _run(capsys, FAST + ["--budget", "0.5", "-o", str(out)])[0] == 0
    code, stdout, _ = _run(capsys, [str(out)], inspect_main)
    assert code == 0
    assert "layer  keep  ratio" in stdout and "scorer    fitprune" in stdout and "flops_fraction" in stdout
    assert len([line for line in stdout.splitlines() if line[:5].strip().isdigit()]) == 8


def _corrupt_image_folder(tmp_path: Path) -> str:
    folder = tmp_path / "cal"
    folder.mkdir()
    (folder / "broken.png").write_bytes(os.urandom(300))
    return str(folder)


def _recipe_file(tmp_path: Path, content: bytes) -> str:
    path = tmp_path / "given.safetensors"
    path.write_bytes(content)
    return str(path)


BAD_COMPILES = {
    "budget zero": (["--budget", "0"], "budget must be in (0, 1]"),
    "budget above one": (["--budget", "1.5"], "budget must be in (0, 1]"),
    "budget not a number": (["--budget", "abc"], "budget must be a number"),
    "budget below feasible": (["--budget", "0.01"], "cannot be met"),
    "missing calibration": (["--budget", "0.5", "--calibration", "/no/such/place"], "calibration data not found"),
    "corrupt image": (["--budget", "0.5", "--calibration", "<corrupt>"], "broken.png"),
    "unknown model": (["--budget", "0.5", "--model", "not-a-model"], "not-a-model"),
    "bad dtype": (["--budget", "0.5", "--dtype", "float8"], "float8"),
    "bad device": (["--budget", "0.5", "--device", "gpu0"], "not a torch device"),
    "unavailable device": (["--budget", "0.5", "--device", "cuda" if not __import__("torch").cuda.is_available() else "cuda:99"], "device 'cuda"),
    "output dir missing": (["--budget", "0.5", "-o", "/no/such/dir/r.safetensors"], "does not exist"),
    "meta device": (["--budget", "0.5", "--device", "meta"], "cannot run calibration"),
    "corrupt stats": (["--budget", "0.5", "--stats", "<garbage>"], "not a statistics file"),
}


@pytest.mark.parametrize("name", sorted(BAD_COMPILES))
def test_bad_compile_inputs_give_one_line_and_no_file(tmp_path, capsys, name):
    extra, expected = BAD_COMPILES[name]
    extra = [
        _corrupt_image_folder(tmp_path) if a == "<corrupt>" else _recipe_file(tmp_path, b"garbage" * 10) if a == "<garbage>" else a
        for a in extra
    ]
    out = tmp_path / "r.safetensors"
    argv = (["--model", "tiny-llava"] if "--model" not in extra else []) + ["--quiet"] + extra
    argv += [] if "-o" in extra else ["-o", str(out)]
    code, stdout, err = _run(capsys, argv)
    assert code != 0
    assert expected in err
    assert len(err.strip().splitlines()) == 1, err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []


@pytest.mark.parametrize(
    "content, expected",
    [(b"\x00" * 3, "too short"), (os.urandom(200), "not a valid recipe"), (b"", "too short")],
)
def test_inspect_rejects_corrupt_and_foreign_recipes_in_one_line(tmp_path, capsys, content, expected):
    code, _, err = _run(capsys, [_recipe_file(tmp_path, content)], inspect_main)
    assert code != 0 and expected in err and len(err.strip().splitlines()) == 1


def test_inspect_rejects_a_foreign_safetensors_file(tmp_path, capsys):
    import numpy as np
    from safetensors.numpy import save_file

    path = tmp_path / "weights.safetensors"
    save_file({"w": np.zeros(3, dtype=np.float32)}, str(path))
    code, _, err = _run(capsys, [str(path)], inspect_main)
    assert code != 0 and "not written by recipe-compiler" in err and len(err.strip().splitlines()) == 1


def test_console_scripts_are_installed_or_module_runs():
    # The README's quick start relies on the console scripts; an editable install provides them.
    assert shutil.which("recipe-compile") or Path(sys.executable).with_name("recipe-compile").exists()


# ------------------------------------------------------------------ outputs that must not be replaced
def _special(tmp_path: Path, kind: str) -> Path:
    """A non-regular file that writing a recipe over would destroy (or block on)."""
    if kind == "fifo":
        path = tmp_path / "pipe.safetensors"
        os.mkfifo(path)
    elif kind == "device node":  # a private copy of /dev/null (root can make one), else /dev/null itself
        path = tmp_path / "null.safetensors"
        try:
            os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        except (PermissionError, OSError):
            path = Path("/dev/null")
    elif kind == "/dev/null":
        path = Path("/dev/null")
    else:  # a symbolic link to /dev/null
        path = tmp_path / "link.safetensors"
        path.symlink_to("/dev/null")
    return path


@pytest.fixture
def guard_dev_null(monkeypatch):
    """Fail, never replace, if anything tries to rename a file onto /dev/null (the product must refuse first)."""
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if os.path.realpath(dst) == "/dev/null" or os.path.realpath(dst).startswith("/dev/"):
            raise AssertionError(f"os.replace onto {dst}: the output check let a device through")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


def _kind_of(path: Path) -> int:
    return stat.S_IFMT(os.stat(path).st_mode)


@pytest.mark.parametrize("option", ["-o", "--save-stats"])
@pytest.mark.parametrize("kind", ["fifo", "device node", "/dev/null", "symlink to /dev/null"])
def test_an_output_that_is_not_a_regular_file_is_refused_in_one_line_and_left_alone(tmp_path, capsys, guard_dev_null, option, kind):
    target = _special(tmp_path, kind)
    before = _kind_of(target)
    recipe = tmp_path / "r.safetensors"
    outputs = ["-o", str(target)] if option == "-o" else ["-o", str(recipe), "--save-stats", str(target)]
    code, stdout, err = _run(capsys, FAST + ["--budget", "0.5"] + outputs)
    assert code == 1 and stdout == ""
    assert len(err.strip().splitlines()) == 1 and "not a regular file" in err and str(target) in err, err
    assert _kind_of(target) == before  # still the FIFO / device it was
    assert not recipe.exists() and [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []


@pytest.mark.parametrize("spelling", ["same text", "relative and absolute", "through a symlink", "hard link", "--stats input"])
def test_recipe_and_statistics_outputs_naming_one_file_are_refused(tmp_path, capsys, monkeypatch, spelling):
    monkeypatch.chdir(tmp_path)
    stats = tmp_path / "stats.safetensors"
    if spelling in ("hard link", "--stats input"):
        assert _run(capsys, FAST + ["--budget", "0.5", "-o", str(tmp_path / "first.safetensors"), "--save-stats", str(stats)])[0] == 0
    kept = stats.read_bytes() if stats.exists() else None
    if spelling == "same text":
        recipe, stats_arg = str(stats), str(stats)
    elif spelling == "relative and absolute":
        recipe, stats_arg = "stats.safetensors", str(stats)
    elif spelling == "through a symlink":
        (tmp_path / "alias.safetensors").symlink_to(stats)
        recipe, stats_arg = str(tmp_path / "alias.safetensors"), str(stats)
    elif spelling == "hard link":
        os.link(stats, tmp_path / "hard.safetensors")
        recipe, stats_arg = str(tmp_path / "hard.safetensors"), str(stats)
    else:
        recipe, stats_arg = str(stats), None
    argv = FAST + ["--budget", "0.5", "-o", recipe] + (["--save-stats", stats_arg] if stats_arg else ["--stats", str(stats)])
    code, stdout, err = _run(capsys, argv)
    assert code == 1 and stdout == "" and len(err.strip().splitlines()) == 1, err
    assert ("name the same file" in err) if stats_arg else ("names the statistics file given to --stats" in err), err
    assert (stats.read_bytes() if stats.exists() else None) == kept  # nothing written, nothing lost

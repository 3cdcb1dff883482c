"""Interrupted and failed recipe writes: the target holds the old file or none, never half a file.

A child process saves a recipe through the real ``write_atomic`` and stops at a chosen moment
(after the temp file is made, between chunks of the bytes, before the fsync, before and after the
rename); the test SIGKILLs it there. Write errors (read-only directory, disk full, a refused
rename) and Ctrl-C during the write go through ``recipe-compile`` itself.

What a killed writer leaves: the target is untouched until ``os.replace``; the partial bytes sit in
a temp file named ``.NAME.XXXXXXXX.tmp`` next to it, which a SIGKILL cannot clean up (any error
or Ctrl-C does remove it).
"""
from __future__ import annotations

import errno
import os
import re
import select
import signal
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
import runtime.recipe as recipe_module
from runtime import Recipe, RecipeError, load

ROOT = Path(__file__).resolve().parents[1]
FINGERPRINT = {"model_type": "llava", "num_layers": 1024, "hidden_size": 64, "num_heads": 4,
               "num_kv_heads": 2, "visual_tokens": 4096, "config_hash": "00112233aabbccdd"}
TEMP_NAME = re.compile(r"\.r\.safetensors\.[A-Za-z0-9_]+\.tmp")

# The child: save NEW_RECIPE to argv[2], printing the phase and then waiting to be killed when it
# reaches argv[1]. The bytes go out in 4 flushed chunks so a kill can land between them.
CHILD = r"""
import os, sys, time
import numpy as np
import runtime.recipe as recipe_module
from runtime import Recipe

phase, path = sys.argv[1], sys.argv[2]

def reached(name):
    if name == phase:
        print(name, flush=True)
        time.sleep(600)

real = os
class ChunkedFile:
    def __init__(self, handle):
        self.handle = handle
    def write(self, data):
        size = len(data) // 4 + 1
        for i, start in enumerate(range(0, len(data), size), 1):
            self.handle.write(data[start:start + size])
            self.handle.flush()
            reached(f"chunk-{i}")
        return len(data)
    def __getattr__(self, name):
        return getattr(self.handle, name)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        return self.handle.__exit__(*exc)

def fdopen(fd, mode):
    reached("temp-created")
    return ChunkedFile(real.fdopen(fd, mode))

def fsync(fd):
    reached("before-fsync")
    real.fsync(fd)

def replace(src, dst):
    reached("before-replace")
    real.replace(src, dst)
    reached("after-replace")

proxy = type(os)("os_proxy")
proxy.__dict__.update(vars(os))
proxy.fdopen, proxy.fsync, proxy.replace = fdopen, fsync, replace
recipe_module.os = proxy  # only the recipe writer sees the hooks

if sys.argv[3:] == ["cli"]:  # the whole recipe-compile run on tiny-llava
    from recipe_compiler.cli import compile_main
    sys.exit(compile_main(["--model", "tiny-llava", "--samples", "1", "--quiet", "--budget", "0.5", "-o", path]))
fp = {FP}
counts = np.maximum(fp["visual_tokens"] - 3 * np.arange(fp["num_layers"]), 0)
reached("start")
Recipe(keep_count=counts, scorer="text-mean", fingerprint=fp, provenance={"run": "new"}).save(path)
print("done", flush=True)
""".replace("{FP}", repr(FINGERPRINT))

PHASES = ["start", "temp-created", "chunk-1", "chunk-3", "before-fsync", "before-replace", "after-replace"]


def new_recipe_bytes() -> bytes:
    counts = np.maximum(FINGERPRINT["visual_tokens"] - 3 * np.arange(FINGERPRINT["num_layers"]), 0)
    return Recipe(keep_count=counts, scorer="text-mean", fingerprint=FINGERPRINT, provenance={"run": "new"}).to_bytes()


def old_recipe() -> Recipe:
    counts = np.maximum(FINGERPRINT["visual_tokens"] - np.arange(FINGERPRINT["num_layers"]), 1)
    return Recipe(keep_count=counts, scorer="fitprune", fingerprint=FINGERPRINT, provenance={"run": "old"})


def run_child_until(phase: str, path: Path, *extra: str, timeout: float = 60.0) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    log = path.parent.parent / f"{path.parent.name}-child.log"  # outside the directory under test
    with open(log, "w") as err:  # a file, not a pipe: a chatty child must not block on a full pipe
        child = subprocess.Popen([sys.executable, "-c", CHILD, phase, str(path), *extra], cwd=ROOT, env=env,
                                 stdout=subprocess.PIPE, stderr=err, text=True)
    ready, _, _ = select.select([child.stdout], [], [], timeout)
    line = child.stdout.readline().strip() if ready else ""
    if line != phase:
        child.kill()
        child.communicate()
        pytest.fail(f"child never reached {phase!r} (said {line!r}): {log.read_text()[-2000:]}")
    return child


@pytest.mark.parametrize("previous", [True, False], ids=["over-old-file", "fresh"])
@pytest.mark.parametrize("phase", PHASES)
def test_sigkill_mid_write_leaves_old_file_or_none(tmp_path, phase, previous):
    target = tmp_path / "r.safetensors"
    old = old_recipe().save(target).read_bytes() if previous else None
    new = new_recipe_bytes()
    assert new != old and len(new) > 8 * FINGERPRINT["num_layers"]  # 4 chunks of about 2 KiB

    child = run_child_until(phase, target)
    os.kill(child.pid, signal.SIGKILL)
    child.communicate()
    assert child.returncode == -signal.SIGKILL

    if phase == "after-replace":
        assert target.read_bytes() == new
    elif previous:
        assert target.read_bytes() == old, "the previous recipe changed before the rename"
    else:
        assert not target.exists(), "a partial recipe appeared at the target"
    if target.exists():
        load(target)  # whatever is there is a whole, valid recipe
    # Anything else is the writer's own temp file, recognisable by name, holding a prefix of the new bytes.
    others = [p for p in tmp_path.iterdir() if p != target]
    for stray in others:
        assert TEMP_NAME.fullmatch(stray.name), stray.name
        assert new.startswith(stray.read_bytes())
    written_temp = phase not in ("start", "after-replace")
    assert len(others) == (1 if written_temp else 0), [p.name for p in others]


def test_sigkill_of_recipe_compile_mid_write_keeps_the_previous_recipe(tmp_path):
    target = tmp_path / "r.safetensors"
    old = old_recipe().save(target).read_bytes()
    child = run_child_until("chunk-1", target, "cli", timeout=300)  # calibrated, searched, verified; writing
    os.kill(child.pid, signal.SIGKILL)
    child.communicate()
    assert child.returncode == -signal.SIGKILL
    assert target.read_bytes() == old
    strays = [p for p in tmp_path.iterdir() if p != target]
    assert len(strays) == 1 and TEMP_NAME.fullmatch(strays[0].name), strays
    with pytest.raises(RecipeError, match="truncated|header length"):  # the partial bytes were never a recipe
        load(strays[0])


def test_unkilled_child_writes_the_whole_file_and_no_temp(tmp_path):
    target = tmp_path / "r.safetensors"
    old_recipe().save(target)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", CHILD, "never", str(target)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "done", done.stderr
    assert target.read_bytes() == new_recipe_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["r.safetensors"]


def test_written_file_has_the_mode_a_plain_open_gives(tmp_path):
    old_umask = os.umask(0o027)
    try:
        path = old_recipe().save(tmp_path / "r.safetensors")
        plain = tmp_path / "plain"
        plain.write_bytes(b"")
    finally:
        os.umask(old_umask)
    assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == 0o640


# ----------------------------------------------------------------------------- through the CLI

FAST = ["--model", "tiny-llava", "--samples", "1", "--quiet", "--budget", "0.5"]


def _recipe_os(monkeypatch, **hooks):
    """Give the recipe writer an ``os`` with some functions replaced; nothing else sees them."""
    proxy = types.ModuleType("os_proxy")
    proxy.__dict__.update(vars(os))
    proxy.__dict__.update(hooks)
    monkeypatch.setattr(recipe_module, "os", proxy)


class _FailingFile:
    """Writes the first half of the bytes, then raises ``error``."""

    def __init__(self, handle, error: BaseException):
        self.handle, self.error = handle, error

    def write(self, data):
        self.handle.write(data[: len(data) // 2])
        self.handle.flush()
        raise self.error

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.handle.__exit__(*exc)


def _read_only_dir(*args, **kwargs):
    raise PermissionError(errno.EACCES, "Permission denied")


def _install(kind: str, monkeypatch) -> None:
    if kind == "read-only directory":  # root ignores directory modes here, so refuse the temp file
        monkeypatch.setattr(recipe_module, "tempfile", types.SimpleNamespace(mkstemp=_read_only_dir))
    elif kind == "disk full mid-write":
        _recipe_os(monkeypatch, fdopen=lambda fd, mode: _FailingFile(os.fdopen(fd, mode), OSError(errno.ENOSPC, "No space left on device")))
    elif kind == "rename refused":
        _recipe_os(monkeypatch, replace=_read_only_dir)


WRITE_ERRORS = {
    "read-only directory": "Permission denied",
    "disk full mid-write": "No space left on device",
    "rename refused": "Permission denied",
}


_run = run_cli


@pytest.mark.parametrize("previous", [True, False], ids=["over-old-file", "fresh"])
@pytest.mark.parametrize("kind", sorted(WRITE_ERRORS))
def test_cli_write_error_is_one_line_and_leaves_old_file_or_none(tmp_path, capsys, monkeypatch, kind, previous):
    target = tmp_path / "r.safetensors"
    old = old_recipe().save(target).read_bytes() if previous else None
    _install(kind, monkeypatch)
    code, out, err = _run(capsys, FAST + ["-o", str(target)])
    assert code == 1
    assert out == ""  # no summary line claiming a recipe was written
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"recipe-compile: error: cannot write recipe to {target}: {WRITE_ERRORS[kind]}"), err
    assert (target.read_bytes() == old) if previous else not target.exists()
    assert [p.name for p in tmp_path.iterdir()] == (["r.safetensors"] if previous else [])


@pytest.mark.parametrize(
    "where, expected",
    [("parent is a file", "does not exist"), ("/proc", "not writable")],
)
def test_cli_unwritable_destination_fails_before_compiling(tmp_path, capsys, where, expected):
    if where == "parent is a file":
        blocker = tmp_path / "a-file"
        blocker.write_text("not a directory")
        target = blocker / "r.safetensors"
    else:
        target = Path("/proc/self/r.safetensors")  # unwritable even for root
    code, out, err = _run(capsys, FAST + ["-o", str(target)])
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and expected in err, err
    assert not target.exists()
    if where == "parent is a file":
        assert [p.name for p in tmp_path.iterdir()] == ["a-file"]


def test_cli_ctrl_c_during_write_keeps_old_file_and_removes_temp(tmp_path, capsys, monkeypatch):
    target = tmp_path / "r.safetensors"
    old = old_recipe().save(target).read_bytes()
    _recipe_os(monkeypatch, fdopen=lambda fd, mode: _FailingFile(os.fdopen(fd, mode), KeyboardInterrupt()))
    code, out, err = _run(capsys, FAST + ["-o", str(target)])
    assert code == 130 and out == ""
    assert err.strip() == "recipe-compile: interrupted; no recipe was written"
    assert target.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["r.safetensors"]

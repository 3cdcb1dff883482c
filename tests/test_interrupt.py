"""Ctrl-C during start-up: every console script prints one line and exits 130, wherever it lands.

A real SIGINT is delivered at a chosen point of start-up: a ``sitecustomize`` on ``PYTHONPATH``
installs an import hook that, when the named module is first imported, sends SIGINT to its own
process and sleeps, so the interrupt lands inside that import. The heavy imports (numpy, torch,
transformers, safetensors) are where start-up spends its seconds, and they come before and inside
the code that parses the options.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

HOOK = '''
import os, signal, sys, time

class _InterruptOnImport:
    """Send SIGINT to this process the first time $RECIPE_TEST_SIGINT_ON is imported."""

    def find_spec(self, name, path=None, target=None):
        if name != os.environ.get("RECIPE_TEST_SIGINT_ON"):
            return None
        sys.meta_path.remove(self)
        open(os.environ["RECIPE_TEST_SIGINT_MARK"], "w").close()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(30)  # the KeyboardInterrupt interrupts this sleep, inside the import

# Ctrl-C reaches a process only if it listens: a job started in the background by a
# non-interactive shell inherits SIGINT ignored (and may inherit it blocked), and Python then
# never turns it into KeyboardInterrupt. Listen as a terminal's foreground process does.
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.meta_path.insert(0, _InterruptOnImport())
'''

MESSAGES = {
    "recipe-compile": "recipe-compile: interrupted; no recipe was written",
    "recipe-inspect": "recipe-inspect: interrupted",
    "recipe-eval": "recipe-eval: interrupted",
}
ARGS = {
    "recipe-compile": ["--model", "tiny-llava", "--budget", "0.5", "--samples", "2", "--quiet"],
    "recipe-inspect": ["fitprune:40"],
    "recipe-eval": ["--recipe", "fitprune:40", "--samples", "1"],
}
# Modules every entry point imports during start-up, from the first (numpy, under the option
# parser's choices) to the model stack.
MODULES = ["numpy", "torch", "safetensors", "transformers"]


def _script(name: str) -> list[str]:
    script = Path(sys.executable).with_name(name)
    assert script.exists(), f"console script {name} is not installed next to {sys.executable}; pip install -e ."
    return [str(script)]


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("entry", sorted(MESSAGES))
def test_ctrl_c_during_start_up_is_one_line_and_exit_130(tmp_path, entry, module):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(HOOK)
    mark = tmp_path / "fired"
    output = tmp_path / "r.safetensors"
    args = ARGS[entry] + (["-o", str(output)] if entry == "recipe-compile" else [])
    env = {**os.environ, "PYTHONPATH": str(hooks) + os.pathsep + os.environ.get("PYTHONPATH", ""), "RECIPE_TEST_SIGINT_ON": module, "RECIPE_TEST_SIGINT_MARK": str(mark),
           "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(_script(entry) + args, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert mark.exists(), f"{module} was never imported by {entry}: the interrupt did not land in start-up"
    assert result.returncode == 130, (result.returncode, result.stderr[-2000:])
    assert result.stderr.strip().splitlines() == [MESSAGES[entry]], result.stderr[-2000:]
    assert result.stdout == "" and not output.exists()


def test_the_hook_really_interrupts_an_unguarded_import(tmp_path):
    """Control: the same hook in a plain ``python -c 'import numpy'`` dies of the interrupt with a traceback."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(HOOK)
    env = {**os.environ, "PYTHONPATH": str(hooks) + os.pathsep + os.environ.get("PYTHONPATH", ""), "RECIPE_TEST_SIGINT_ON": "numpy", "RECIPE_TEST_SIGINT_MARK": str(tmp_path / "m")}
    result = subprocess.run([sys.executable, "-c", "import numpy"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode in (-signal.SIGINT, 130) and "KeyboardInterrupt" in result.stderr

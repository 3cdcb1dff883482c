"""What every console entry point shares: one-line errors, exit codes, option types, device checks.

``recipe-compile`` / ``recipe-inspect`` (:mod:`recipe_compiler.cli`) and ``recipe-eval``
(:mod:`recipe_compiler.evaluate`) build their parsers from these, so a bad option reads the same
in each.
"""
from __future__ import annotations

import argparse

import torch

from runtime.attention import WRAPPED

from .errors import CompileError

EXIT_USAGE = 2
EXIT_FAILURE = 1

ATTN_IMPLEMENTATIONS = tuple(WRAPPED)
"""``--attn-implementation`` choices: the attention kernels the pruning runtime can wrap."""


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line (not argparse's usage block)."""

    def error(self, message: str) -> None:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    """An option value that must be an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def check_device(name: str) -> None:
    """Raise :class:`CompileError` (one line) unless ``name`` is a torch device this machine has."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CompileError(f"device {name!r} is not a torch device; use cpu, cuda, cuda:1, mps, …") from None
    available = {
        "cuda": torch.cuda.is_available,
        "mps": lambda: getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
    }.get(device.type, lambda: True)
    if not available():
        raise CompileError(f"device {name!r} is not available on this machine; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise CompileError(f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")


def one_line(exc: BaseException) -> str:
    """An error's message on one line (its type name when it has none)."""
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())

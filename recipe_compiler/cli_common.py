"""What every console entry point shares: one-line errors, exit codes, option types, device and output checks.

``recipe-compile`` / ``recipe-inspect`` / ``recipe-eval`` (:mod:`recipe_compiler.cli`,
:mod:`recipe_compiler.evaluate`, click commands built from :mod:`recipe_compiler.cli_click`) share
these, so a bad input reads the same in each. This module imports only the standard library at the top: an entry point imports it before
its interrupt guard is in place, so Ctrl-C during the heavy imports (torch, transformers) still
lands inside the guard and prints one line.
"""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

EXIT_USAGE = 2
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130


def attn_implementations() -> tuple[str, ...]:
    """``--attn-implementation`` choices: the attention kernels the pruning runtime can wrap."""
    from runtime.attention import WRAPPED

    return tuple(WRAPPED)


def interruptible(prog: str, message: str) -> Callable:
    """Turn a ``KeyboardInterrupt`` raised anywhere inside an entry point into one line and exit code 130.

    Example:
        >>> @interruptible("recipe-x", "interrupted")
        ... def main(argv=None):
        ...     raise KeyboardInterrupt
        >>> main()
        130
    """
    def wrap(main: Callable) -> Callable:
        @functools.wraps(main)
        def guarded(argv: Sequence[str] | None = None, *args: object, **kwargs: object) -> int:
            try:
                return main(argv, *args, **kwargs)
            except KeyboardInterrupt:
                print(f"{prog}: {message}", file=sys.stderr)
                return EXIT_INTERRUPTED
        return guarded
    return wrap


def check_device(name: str) -> None:
    """Refuse, in one line, a device the CLI cannot run the model on (before any model time).

    Raises:
        CompileError: not a torch device, ``meta`` (shapes only), or not available on this machine.
    """
    import torch

    from .errors import CompileError

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise CompileError(f"device {name!r} is not a torch device; use cpu, cuda, cuda:1, mps, …") from None
    if device.type == "meta":
        raise CompileError(f"device {name!r} holds shapes, not numbers: it cannot run calibration or evaluation; use --device cpu or cuda")
    available = {
        "cuda": torch.cuda.is_available,
        "mps": lambda: getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
    }.get(device.type, lambda: True)
    if not available():
        raise CompileError(f"device {name!r} is not available on this machine; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise CompileError(f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda", "mps"):  # xpu, hpu, xla, …: usable only if a tensor can live there
        try:
            torch.empty(1, device=device)
        except Exception as exc:  # noqa: BLE001 - any backend failure means "not usable here"
            raise CompileError(f"device {name!r} is not usable on this machine ({one_line(exc)[:120]}); use --device cpu") from None


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file, by any spelling (relative or absolute, through symlinks, hard links)."""
    try:
        if a.resolve() == b.resolve():
            return True
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except (OSError, ValueError, RuntimeError):
        return False


def check_output_file(path: Path, what: str) -> None:
    """Refuse, before any work, an output path that is a directory or an existing non-regular file.

    Writing replaces the target (atomically), so a device node or FIFO would be destroyed
    (``-o /dev/null`` as root) or block; such a target is refused with one line.

    Raises:
        CompileError: the path is a directory or a device, FIFO or socket.
    """
    from runtime.recipe import special_file_kind

    from .errors import CompileError

    if path.is_dir():
        raise CompileError(f"{what} output {path} is a directory; give a file name such as {path / 'recipe.safetensors'}")
    kind = special_file_kind(path)
    if kind is not None:
        raise CompileError(f"{what} output {path} is {kind}, not a regular file; writing would replace it: give a file path")


def one_line(exc: BaseException) -> str:
    """An error's message on one line (its type name when it has none)."""
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())

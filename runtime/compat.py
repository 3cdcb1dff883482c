"""Which transformers releases the runtime is tested on, and a warning at import outside them.

The package accepts a wide range (pyproject.toml: ``transformers>=5.19,<6``) so that it installs beside
vLLM, TRL or a newer transformers; the runtime hooks into transformers internals, so a release
outside :data:`TESTED_TRANSFORMERS` gets a ``RuntimeWarning`` when ``runtime`` is imported. The
version is read from the installed distribution's metadata: ``import runtime`` still does not
import transformers.

Tested: 5.23 (the whole suite, CI's main environment); 5.19.0, 5.22.2, 5.24.0 and 5.25.0 (the conformance
subset, README "Which transformers"); the newest release on the package registry (the subset, every
CI run, in ``scripts/transformers-env.sh``'s environment). 5.16.1 fails the Qwen2-VL pruning cells,
hence the lower bound. Raise the upper bound when CI passes on a newer release.
"""
from __future__ import annotations

import re
import warnings

TESTED_TRANSFORMERS = ((5, 19), (5, 25))  # inclusive (major, minor) bounds; any patch release
SUPPORTED_RANGE = ">=5.19,<6"  # what pyproject.toml declares


def _minor(version: str) -> tuple[int, int] | None:
    match = re.match(r"^(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else None


def untested_transformers(version: str | None = None) -> str | None:
    """The warning for a transformers release outside the tested range, or ``None`` (inside, or not installed).

    Args:
        version: a version string; default: the installed transformers' (from its metadata).

    Example:
        >>> untested_transformers("5.23.0") is None
        True
        >>> untested_transformers("5.30.1").split(";")[0]
        'recipe-compiler runtime: transformers 5.30.1 is outside the tested range 5.19 to 5.25'
    """
    if version is None:
        from importlib import metadata

        try:
            version = metadata.version("transformers")
        except metadata.PackageNotFoundError:
            return None
    minor = _minor(version)
    low, high = TESTED_TRANSFORMERS
    if minor is not None and low <= minor <= high:
        return None
    return (f"recipe-compiler runtime: transformers {version} is outside the tested range "
            f"{low[0]}.{low[1]} to {high[0]}.{high[1]}; the pruning hooks may fail or prune differently; "
            f"install a tested release (pip install 'transformers>={low[0]}.{low[1]},<{high[0]}.{high[1] + 1}') "
            "or run the conformance subset on yours (scripts/transformers-env.sh)")


def warn_if_untested(version: str | None = None) -> None:
    """Issue :func:`untested_transformers`'s warning (a ``RuntimeWarning``) when there is one."""
    message = untested_transformers(version)
    if message is not None:
        warnings.warn(message, RuntimeWarning, stacklevel=3)

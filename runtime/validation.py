"""Small checks shared by everything that validates user or file input (the recipe loader, the methods)."""
from __future__ import annotations

import math
from typing import Any


def is_int(value: Any) -> bool:
    """An ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite JSON number that fits a float (an over-long integer would overflow at run time)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def short(value: Any, limit: int = 80) -> str:
    """``repr`` cut to ``limit`` characters, so a corrupt value cannot flood an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"

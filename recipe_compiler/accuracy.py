"""Exact-match accuracy of one-word (or short) answers, with 95 % Wilson intervals (pure Python).

``recipe-eval`` uses this when its data carries answers (a manifest's ``"answer"`` field): a
generated continuation is right when its first words, normalised (lower case, punctuation
dropped), are the answer's words.

Example:
    >>> exact_match("Red </s>", "red")
    True
    >>> round(wilson(45, 50)[0], 3)
    0.786
"""
from __future__ import annotations

import math
import re
from typing import Iterable, Sequence

__all__ = ["normalize", "exact_match", "wilson", "accuracy_report"]

_PUNCT = re.compile(r"[^\w\s]")


def normalize(text: str) -> list[str]:
    """Lower-case words of ``text`` with punctuation and special tokens (``<...>``) removed."""
    text = re.sub(r"<[^<>\s]*>", " ", text)
    return _PUNCT.sub(" ", text.lower()).split()


def exact_match(generated: str, answer: str) -> bool:
    """Whether ``generated`` starts with the words of ``answer`` (after :func:`normalize`)."""
    want = normalize(answer)
    return bool(want) and normalize(generated)[: len(want)] == want


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of ``k`` successes in ``n`` trials (95 % for ``z = 1.96``).

    Returns:
        ``(low, high)``; ``(0.0, 1.0)`` when ``n == 0``.
    """
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _one(right: int, n: int) -> dict:
    low, high = wilson(right, n)
    return {"accuracy": right / n if n else float("nan"), "correct": right, "n": n, "ci95": [low, high]}


def accuracy_report(correct: Sequence[bool], qtypes: Iterable[str | None] | None = None) -> dict:
    """Accuracy over all questions and per question type.

    Args:
        correct: one flag per question.
        qtypes: each question's type (``None``: untyped; left out of ``per_type``).

    Returns:
        ``{"accuracy", "correct", "n", "ci95": [low, high], "per_type": {type: {...same keys}}}``.
    """
    flags = [bool(c) for c in correct]
    out = _one(sum(flags), len(flags))
    per: dict[str, list[int]] = {}
    for flag, qtype in zip(flags, qtypes if qtypes is not None else [None] * len(flags)):
        if qtype is None:
            continue
        cell = per.setdefault(qtype, [0, 0])
        cell[0] += int(flag)
        cell[1] += 1
    out["per_type"] = {name: _one(*cell) for name, cell in sorted(per.items())}
    return out

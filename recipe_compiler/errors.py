"""Typed, user-facing errors of the compiler.

Every error a user can cause (bad option, bad calibration entry, unknown model, infeasible
budget) is one of these; the CLI prints ``str(error)`` on one line and exits non-zero.
Messages say what was wrong and what to do about it.
"""


class CompileError(Exception):
    """Base class of every user-facing compiler error."""


class BudgetError(CompileError):
    """The FLOPs budget is out of range or cannot be met by any schedule.

    Attributes:
        smallest_budget: when no schedule the compiler can build meets the budget, the FLOPs
            fraction of the cheapest one on these prompts (in-LLM only: dropping every visual token
            after the first prunable layer; with a pre-LLM stage: its cheapest candidate); None for
            every other budget error.
    """

    def __init__(self, message: str, smallest_budget: float | None = None):
        super().__init__(message)
        self.smallest_budget = smallest_budget


class CalibrationDataError(CompileError):
    """A calibration entry (image or prompt) is missing, unreadable, empty, of an unusable size,
    or does not fit the model (its prompt and image tokens exceed the model's positions)."""


class ModelNotFoundError(CompileError):
    """The model is not a known alias, a local directory or a cached hub id."""


class StatisticsError(CompileError):
    """Saved calibration statistics are unreadable or belong to another model or set."""

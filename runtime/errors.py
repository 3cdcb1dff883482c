"""Errors raised by the runtime. Each names the offending file or field and say what to do."""


class RecipeError(ValueError):
    """A recipe file is unreadable, malformed, or from an unknown schema."""


class RecipeMismatchError(RecipeError):
    """A valid recipe was compiled for a different model than the one it is applied to."""


class UnsupportedModelError(RecipeMismatchError):
    """The model cannot be pruned: its family is not supported, or this model of a family has a
    layout the pruner does not handle (e.g. decoder layers of different kinds); the message names
    the model type and what is supported."""


class RecipeAlreadyAppliedError(RuntimeError):
    """A pruning recipe is applied to a model that already carries one (hooks would stack)."""


class PruningUnsupportedError(RuntimeError):
    """A call that cannot run on a pruned model (e.g. a forward with ``labels``); the message says what to do."""


class StageCannotRun(RuntimeError):
    """A pre-LLM stage cannot map this request's images to their tokens; the request passes through unpruned."""

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


class HubError(RecipeError):
    """The Hugging Face Hub could not give a file (a recipe, or a model's config or weights).

    The subclass says what happened (raised bare only for other Hub failures, such as a server error),
    and the one-line message names the repository and what to do. A ``RecipeError``, so code that handles a bad recipe handles these too.
    """


class HubOfflineError(HubError):
    """The file is not in the local Hub cache, and the Hub cannot be asked (offline mode, or unreachable)."""


class HubNotFoundError(HubError):
    """The Hub has no such repository, revision or file (a private repository looks the same without a token)."""


class HubGatedRepoError(HubError):
    """The repository is gated and this account has not been granted access."""


class HubAuthError(HubError):
    """The Hub refused the credentials: an invalid token, or one without the permission the request needs."""

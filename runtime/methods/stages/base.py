"""What a pre-LLM stage is, and the registry of stages (``STAGES``).

A stage drops visual tokens on entry to decoder layer 0, one *view* (a patch grid ranked
together, :class:`runtime.families.View`) at a time. A stage module owns everything about its
method: its name, the recipe fields and parameters it takes (schema, defaults, validation), the
vision signals it reads (families say which they can give), the calibration statistic its scores
are recorded under, and its per-view selection. The mechanism that hooks the model, matches images
to placeholders and builds the views is :mod:`runtime.prellm_stage`; the family geometry is in
:mod:`runtime.families`.

A selection is a :class:`Selection`: the kept tokens of a view and, for a stage that *writes*
features (merging dropped tokens into kept ones, e.g. VisionZip's contextual tokens), the new
input embeddings of the kept tokens; the pruner writes them before layer 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ...errors import RecipeError
from ...registry import Registry
from ...validation import short

NO_STAGE = "none"
"""The recipe's ``pre_llm.method`` when no stage runs."""

STAGES = Registry("pre-LLM stage")
"""name → :class:`Stage`; filled by the stage modules, in the order the package imports them."""


def register_stage(name: str) -> Callable[[type], type]:
    """Class decorator: register one instance of a :class:`Stage` subclass under ``name``."""

    def wrap(cls: type) -> type:
        cls.name = name
        STAGES.register(name, cls())
        return cls

    return wrap


@dataclass
class Selection:
    """What a stage keeps of one view.

    Attributes:
        keep: (n,) bool over the view's tokens, in the view's order.
        features: optional (kept, D) input embeddings for the kept tokens, in order (a stage that
            merges what it drops into what it keeps); ``None`` leaves them as the model made them.
    """

    keep: torch.Tensor
    features: torch.Tensor | None = None


class Stage:
    """One pre-LLM method.

    Attributes:
        name: the registry name, as recipes and the CLI spell it.
        fixed_ratio: the recipe carries ``keep_ratio`` and each view keeps
            ``round_half_up(keep_ratio · n)`` of its ``n`` tokens; otherwise the stage picks its own count.
        signals: vision signals the stage reads (see :attr:`runtime.families.Family.signals`);
            every stage may read the language model's input embeddings at the image positions.
        statistic: the calibration statistics entry its per-token scores are recorded under.
        defaults: parameter defaults (``pre_llm.params``).
        score_params: the parameters its recorded calibration scores depend on.
        selection_params: the parameters that act only on the selection from those scores.
        own_schedule: the stage's parameters fix the in-LLM schedule too (CLS-inflection's stage 2),
            so no schedule search applies to it.
        probes: encoder internals the stage reads beyond the families' signals (installed by
            :meth:`probe_hooks`; each view then carries a :class:`._vision.VisionContext` as
            ``view.vision``).
        writes_features: :meth:`select` returns new input embeddings for the kept tokens.
        baseline: a reference point (random keep), not a method: ``--pre-llm auto`` never picks it.
    """

    name = ""
    fixed_ratio = True
    signals: tuple[str, ...] = ()
    statistic = ""
    defaults: dict = {}
    score_params: tuple[str, ...] = ()
    selection_params: tuple[str, ...] = ()
    own_schedule = False
    probes: tuple[str, ...] = ()
    writes_features = False
    baseline = False

    # ------------------------------------------------------------------ the recipe's parameters
    def validate(self, params: dict, recipe: Any) -> None:
        """Check ``pre_llm.params`` of ``recipe`` (already a dict); raise :class:`RecipeError` naming the field."""
        if params:
            raise RecipeError(f"pre-LLM stage {self.name!r}: unexpected pre_llm.params {short(sorted(params))}")

    def check_model(self, model: Any, params: dict) -> None:
        """Raise ValueError when ``params`` do not fit ``model`` (e.g. a vision layer it lacks)."""

    def resolve(self, params: dict) -> dict:
        """``params`` with the defaults filled in; ValueError for a value the stage cannot run with."""
        return {**self.defaults, **params}

    def recipe_params(self, recorded: dict, options: dict) -> dict:
        """The recipe's ``pre_llm.params`` for scores recorded with ``recorded`` and the selection ``options``.

        Score parameters are what the recorded scores were computed with (default where not
        recorded and the stage has one); selection parameters come from ``options`` (or the default).
        """
        out = {}
        for key in self.score_params:
            if key in recorded:
                out[key] = recorded[key]
            elif key in self.defaults:
                out[key] = self.defaults[key]
        for key in self.selection_params:
            out[key] = options.get(key, self.defaults.get(key))
        return out

    def statistics_mismatch(self, recorded: dict, wanted: dict) -> str | None:
        """Why scores recorded with ``recorded`` parameters are not those ``wanted`` (``None``: they are)."""
        for key in self.score_params:
            if key in wanted and recorded.get(key) != wanted[key]:
                return (f"the saved statistics hold {self.name} scores for {key}={recorded.get(key, 'unknown')!r}, "
                        f"not {wanted[key]!r}; recollect them without --stats")
        return None

    def model_reason(self, model: Any, family: Any) -> str | None:
        """Why ``model`` cannot run the stage beyond the signals its family gives (``None``: it can)."""
        return None

    def probe_hooks(self, model: Any, family: Any, params: dict, record: Callable[[str, torch.Tensor], None]) -> list:
        """Install the hooks that ``record(probe, value)`` each vision forward's :attr:`probes`; return their handles."""
        return []

    def describe(self, spec: dict) -> str:
        """What the stage of a recipe's ``pre_llm`` keeps, for people (``recipe-inspect``)."""
        return f"keeps {spec.get('keep_ratio', 1.0):g} of each image's tokens"

    # ------------------------------------------------------------------ selection
    def scores(self, view: Any, embeds: torch.Tensor | None, params: dict) -> torch.Tensor | None:
        """(n,) scores of the view's tokens (higher is kept), ``None`` when the inputs are missing.

        Args:
            view: the view, with its captured signals.
            embeds: (B, L, D) language-model input embeddings of the prefill (the projected
                image features at the image positions), or ``None``.
            params: the resolved parameters.
        """
        raise NotImplementedError

    def keep(self, scores: torch.Tensor, keep_ratio: float | None, grid: tuple[int, int] | None, params: dict) -> torch.Tensor:
        """(n,) bool: the survivors of one view from its scores (shared by the runtime and the compiler)."""
        raise NotImplementedError

    def select(self, view: Any, embeds: torch.Tensor | None, keep_ratio: float | None, params: dict) -> Selection:
        """What the stage keeps of ``view`` (and, for a feature-writing stage, what it writes)."""
        return Selection(self.keep(self.scores(view, embeds, params), keep_ratio, view.grid, params))


def view_tokens(view: Any, embeds: torch.Tensor) -> torch.Tensor:
    """(n, D): the language-model input embeddings of a view's tokens."""
    return embeds[view.row, view.positions.to(embeds.device)]

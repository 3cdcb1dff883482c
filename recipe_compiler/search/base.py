"""What a schedule search is, and the registry of searches (``SEARCHES``).

A search picks the in-LLM schedule (visual tokens alive entering each layer) under the FLOPs
budget. A *table* search works on the statistics alone: ``schedule(table, cost, budget_flops) ->
int64 [L]`` keep counts (reference tokens) with ``k_0 = V``, non-increasing and
``Σ_l cost[l, k_l] <= budget_flops``, or :class:`recipe_compiler.errors.BudgetError`. A search
*with the model in the loop* (FitPrune's) runs pruned forwards instead: ``run(...)`` returns the
schedule, its provenance parameters and details. One module per search registers it by name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from runtime.registry import Registry

SEARCHES = Registry("schedule search")
"""name → :class:`Search`; filled by the search modules, in the order the package imports them."""


@dataclass(frozen=True)
class Search:
    """One schedule search.

    Attributes:
        name: the registry name (``--search``).
        provenance: the recipe's ``search_params.method`` for a table search (e.g. ``lagrangian-dp``).
        schedule: a table search's function; ``None`` for a search with the model in the loop.
        run: a model-in-the-loop search: ``run(model, processor, calibration, statistics, shape,
            budget, v_ref, progress=, pre_llm=, **common) -> (keep, search_params, details)``.
        title: how messages name it (e.g. ``FitPrune``).
        passes: model passes over the calibration set it makes (progress bars).
    """

    name: str
    provenance: str = ""
    schedule: Callable | None = None
    run: Callable | None = None
    title: str = ""
    passes: int = 0

    @property
    def in_the_loop(self) -> bool:
        """Whether it runs the model (and so takes one fixed-ratio pre-LLM stage at a fixed ratio)."""
        return self.schedule is None


def register_search(name: str, **attributes: Any) -> Callable[[Callable], Callable]:
    """Function decorator: register a table search ``schedule`` (or, with ``run=``, an in-the-loop one).

    Example:
        >>> @register_search("mine", provenance="my-method")     # doctest: +SKIP
        ... def my_schedule(table, cost, budget_flops): ...
    """

    def wrap(function: Callable) -> Callable:
        field = "run" if attributes.pop("in_the_loop", False) else "schedule"
        SEARCHES.register(name, Search(name, **{field: function}, **attributes))
        return function

    return wrap

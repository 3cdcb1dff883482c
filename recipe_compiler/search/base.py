"""What a schedule search is, and the registry of searches (``SEARCHES``).

A search picks the in-LLM schedule (visual tokens alive entering each layer) under the FLOPs
budget. A *table* search works on the statistics alone: ``schedule(table, cost, budget_flops,
probes=None) -> int64 [L]`` keep counts (reference tokens) with ``k_0 = V``, non-increasing and
``Σ_l cost[l, k_l] + Σ_{cuts} probes[l, k_{l-1}] <= budget_flops`` (:func:`schedule_flops`; the
scorer's probe is paid at every layer the count falls), or :class:`recipe_compiler.errors.BudgetError`. A search
*with the model in the loop* (FitPrune's) runs pruned forwards instead: ``run(...)`` returns the
schedule, its provenance parameters and details. One module per search registers it by name.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from runtime.registry import Registry

SEARCHES = Registry("schedule search")
"""name → :class:`Search`; filled by the search modules, in the order the package imports them."""


def schedule_flops(cost: Any, keep: Any, probes: Any = None) -> np.ndarray | float:
    """FLOPs of schedules: each layer's cost plus the probe of every cut (``probes[l, k_{l-1}]``).

    Args:
        cost: float ``[L, V + 1]``.
        keep: int ``[L]`` or ``[n, L]``.
        probes: float ``[L, V + 1]`` or None (cuts are free).

    Returns:
        float (float64 ``[n]`` for several schedules).

    Example:
        >>> import numpy as np
        >>> schedule_flops(np.tile([1.0, 2.0, 3.0], (2, 1)), [2, 1], np.array([[0, 0, 0], [0, 5.0, 7.0]]))
        12.0
    """
    c = np.asarray(cost, dtype=np.float64)
    k = np.asarray(keep, dtype=np.int64)
    single = k.ndim == 1
    k = np.atleast_2d(k)
    total = np.sum(c[np.arange(c.shape[0])[None, :], k], axis=1)
    if probes is not None:
        p = np.asarray(probes, dtype=np.float64)
        cut = k[:, 1:] < k[:, :-1]
        total = total + np.sum(np.where(cut, p[np.arange(1, c.shape[0])[None, :], k[:, :-1]], 0.0), axis=1)
    return float(total[0]) if single else total


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
        scorer: a peer method's search (FastV, PyramidDrop, …): the run-time scorer its recipes
            use (the method's own ranking). Its ``schedule(table, cost, budget_flops, extra=,
            **params)`` returns ``(keep, found)``: ``extra(keep)`` is the mean FLOPs the scorer's
            own probes add to a schedule (the FLOPs model counts them), ``found`` what it chose
            (recorded in the recipe's ``search_params``).
        params: a peer method's settings (``--search-param NAME=VALUE``): name → :class:`Param`.
        example: a peer method's paper-default schedule, ``example(num_layers, v_ref) -> keep``
            (budget-free; the production matrix runs it).
        needs_visual_rows: whether it reads the visual query rows' statistics (``self_attn``)
            itself, beyond the divergence (FitPrune's rule weighs both distributions), so it cannot
            run on text-only statistics.
    """

    name: str
    provenance: str = ""
    schedule: Callable | None = None
    run: Callable | None = None
    title: str = ""
    passes: int = 0
    scorer: str | None = None
    params: dict = field(default_factory=dict)
    example: Callable | None = None
    needs_visual_rows: bool = False

    @property
    def in_the_loop(self) -> bool:
        """Whether it runs the model (and so takes one fixed-ratio pre-LLM stage at a fixed ratio)."""
        return self.schedule is None

    @property
    def is_method(self) -> bool:
        """Whether it is a peer method's search (fixed scorer, schedule of the method's form)."""
        return self.scorer is not None

    def resolve_params(self, given: dict | None) -> dict:
        """Every setting of a peer method, ``given`` over the defaults; ValueError names a bad one.

        Example:
            >>> from recipe_compiler.search import SEARCHES
            >>> SEARCHES["fastv"].resolve_params({"layer": 3})["layer"]
            3
        """
        given = dict(given or {})
        if given and not self.params:
            raise ValueError(f"--search {self.name} takes no --search-param (got {', '.join(sorted(given))})")
        unknown = sorted(set(given) - set(self.params))
        if unknown:
            raise ValueError(f"--search {self.name} has no parameter {unknown[0]!r}; it takes {', '.join(self.params)}")
        out = {}
        for name, param in self.params.items():
            value = given.get(name, param.default)
            if name in given and not param.check(value):
                raise ValueError(f"--search-param {name}={value!r} is out of range for --search {self.name}: {param.expected}")
            out[name] = value
        return out


@dataclass(frozen=True)
class Param:
    """One setting of a peer method's search.

    Attributes:
        default: the reference's default (``None``: found by the search to meet the budget).
        check: ``check(value) -> bool``.
        expected: what a valid value is, for messages.
        help: one line for ``--help``.
    """

    default: Any
    check: Callable[[Any], bool]
    expected: str
    help: str = ""


def is_int_in(low: int, high: int | None = None) -> Callable[[Any], bool]:
    """``check`` for an integer in ``[low, high]`` (no upper bound with ``high=None``)."""
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low and (high is None or v <= high)


def is_number_in(low: float, high: float, low_open: bool = False) -> Callable[[Any], bool]:
    """``check`` for a number in ``[low, high]`` (``(low, high]`` with ``low_open``)."""
    def check(v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
            return False
        return (v > low if low_open else v >= low) and v <= high

    return check


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

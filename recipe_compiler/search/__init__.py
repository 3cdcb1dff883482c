"""Offline schedule searches (METHODS.md §2) sharing one contract.

Each is ``search(table, cost, budget_flops) -> int64 [L]`` keep counts (reference tokens) with
``k_0 = V``, non-increasing and ``Σ_l cost[l, k_l] <= budget_flops``, or raises
:class:`recipe_compiler.errors.BudgetError`. ``fitprune`` runs the model in the loop and is wired
elsewhere; it is not in :data:`SEARCHES`.

Example:
    >>> sorted(SEARCHES)
    ['gsearch', 'optimal', 'psigmoid']
"""
from recipe_compiler.search.gsearch import gsearch_schedule
from recipe_compiler.search.optimal import optimal_schedule
from recipe_compiler.search.psigmoid import psigmoid_schedule

SEARCHES = {"optimal": optimal_schedule, "gsearch": gsearch_schedule, "psigmoid": psigmoid_schedule}

__all__ = ["SEARCHES", "gsearch_schedule", "optimal_schedule", "psigmoid_schedule"]

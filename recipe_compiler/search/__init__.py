"""Schedule searches (METHODS.md §2), one module each, registered by name (:data:`SEARCHES`).

:data:`TABLE_SEARCHES` holds the table searches' functions, which share one contract (see
:mod:`.base`); ``fitprune`` runs the model in the loop and is not among them.

Example:
    >>> SEARCHES.names()
    ('optimal', 'gsearch', 'psigmoid', 'fitprune', 'fastv', 'pdrop', 'dart', 'sparsevlm')
    >>> sorted(TABLE_SEARCHES)
    ['gsearch', 'optimal', 'psigmoid']
"""
from recipe_compiler.search.base import SEARCHES, Param, Search, register_search

from recipe_compiler.search import optimal  # noqa: F401
from recipe_compiler.search import gsearch  # noqa: F401
from recipe_compiler.search import psigmoid  # noqa: F401
from recipe_compiler.search import fitprune  # noqa: F401
from recipe_compiler.search import fastv  # noqa: F401
from recipe_compiler.search import pdrop  # noqa: F401
from recipe_compiler.search import dart  # noqa: F401
from recipe_compiler.search import sparsevlm  # noqa: F401

TABLE_SEARCHES = {name: search.schedule for name, search in SEARCHES.items() if not search.in_the_loop and not search.is_method}
"""name → ``schedule(table, cost, budget_flops)`` of every table search (the peer methods' searches are apart)."""

__all__ = ["SEARCHES", "TABLE_SEARCHES", "Param", "Search", "register_search"]

"""Compile a pruning recipe: calibrate → search → verify → Recipe (DESIGN.md §2).

Each stage is callable on its own (``collect_statistics``, the searches, ``verify_recipe``); this
module only wires them, times them and records provenance.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from runtime.adapters import adapter_for, model_fingerprint
from runtime.recipe import HEAD_REDUCTIONS, SCORERS, Recipe

from .calibration import CalibrationSet
from .collect import collect_statistics
from .distributed import SINGLE, Sharding
from .divergence import divergence_table, schedule_objective
from .errors import BudgetError, StatisticsError
from .flops import LMShape, cost_table, layer_flops, min_feasible_budget, visual_token_equivalent
from .search import SEARCHES as TABLE_SEARCHES
from .statistics import Statistics
from .verify import Verification, verify_recipe

# Searches on the statistics alone, then FitPrune's model-in-the-loop search.
SEARCHES = (*TABLE_SEARCHES, "fitprune")
_SEARCH_METHODS = {"optimal": "lagrangian-dp", "gsearch": "greedy-epsilon-bisection", "psigmoid": "sigmoid-fit"}
# Verified FLOPs fractions are compared with the budget up to floating-point summation order only.
BUDGET_RTOL = 1e-9


@dataclass(frozen=True)
class CompileConfig:
    """What to compile. Validated on construction; each error names the bad value and the range.

    Args:
        budget: fraction of the unpruned language-model prefill FLOPs the pruned model may spend,
            averaged over the calibration prompts; ``0 < budget <= 1``.
        search: schedule search, one of :data:`SEARCHES`.
        scorer: run-time scorer recorded in the recipe, one of ``runtime.recipe.SCORERS``.
        head_reduce: "max" (FitPrune) or "mean" over attention heads.
        batch_size: calibration samples per forward.
        pre_llm: pre-LLM stage, one of ``prellm_search.PRE_LLM_CHOICES``; ``auto`` evaluates every
            stage (and none) with the in-LLM schedule and keeps the least divergence in budget.
        pre_llm_ratio: fix a fixed-ratio stage's keep ratio instead of trying a grid.
        gprune: G-Prune ``threshold`` / ``temperature`` / ``steps`` overrides (defaults 0.5, 0.03, 5).

    Example:
        >>> CompileConfig(budget=0.45).search
        'optimal'
    """

    budget: float
    search: str = "optimal"
    scorer: str = "fitprune"
    head_reduce: str = "max"
    batch_size: int = 4
    pre_llm: str = "none"
    pre_llm_ratio: float | None = None
    gprune: dict | None = None

    def __post_init__(self) -> None:
        budget = self.budget
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget):
            raise BudgetError(f"budget must be a number in (0, 1], got {budget!r}")
        if not 0 < budget <= 1:
            raise BudgetError(
                f"budget must be in (0, 1] (the fraction of unpruned prefill FLOPs to spend), got {budget}"
            )
        if self.search not in SEARCHES:
            raise ValueError(f"search {self.search!r} is unknown; choose one of {', '.join(SEARCHES)}")
        if self.scorer not in SCORERS:
            raise ValueError(f"scorer {self.scorer!r} is unknown; choose one of {', '.join(SCORERS)}")
        if self.head_reduce not in HEAD_REDUCTIONS:
            raise ValueError(f"head_reduce {self.head_reduce!r} is unknown; choose one of {', '.join(HEAD_REDUCTIONS)}")
        from .prellm_search import PRE_LLM_CHOICES

        if self.pre_llm not in PRE_LLM_CHOICES:
            raise ValueError(f"pre-LLM stage {self.pre_llm!r} is unknown; choose one of {', '.join(PRE_LLM_CHOICES)}")
        if self.pre_llm != "none" and self.search not in TABLE_SEARCHES:
            raise ValueError(f"--pre-llm {self.pre_llm} needs a table search ({', '.join(TABLE_SEARCHES)}), not {self.search!r}")
        if self.pre_llm_ratio is not None:
            r = self.pre_llm_ratio
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1:
                raise ValueError(f"pre-LLM keep ratio must be a number in (0, 1], got {r!r}")
            if self.pre_llm in ("none", "auto", "cls-inflection"):
                raise ValueError(f"a pre-LLM keep ratio needs a fixed-ratio stage (g-prune, fopru-rank, fopru-row), not {self.pre_llm!r}")
        for key, value in (self.gprune or {}).items():
            ok = {"threshold": lambda v: -1 <= v <= 1, "temperature": lambda v: 0 < v < math.inf,
                  "steps": lambda v: isinstance(v, int) and 0 <= v <= 10**6}.get(key)
            if ok is None or isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
                raise ValueError(f"G-Prune parameter {key}={value!r} is unknown or out of range "
                                 "(threshold in [-1, 1], temperature > 0, steps a non-negative integer)")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")


@dataclass
class CompileResult:
    """A compiled recipe and what was measured on the way.

    Attributes:
        recipe: the :class:`runtime.Recipe`; ``recipe.save(path)`` writes it.
        statistics: the calibration statistics (reusable with ``--stats``).
        verification: what the recipe really did on the calibration samples.
        divergence: the search objective (attention divergence) of the chosen schedule.
        visual_token_equivalent: constant visual-token count with the same FLOPs.
        timings: seconds per stage ("calibrate", "search", "verify").
        details: search-specific facts (e.g. FitPrune's alpha trace).
    """

    recipe: Recipe
    statistics: Statistics
    verification: Verification
    divergence: float
    visual_token_equivalent: float
    timings: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)


def compile_recipe(
    model: Any,
    processor: Any,
    calibration: CalibrationSet,
    config: CompileConfig,
    *,
    format_prompt: Callable[[str], str] = lambda p: p,
    statistics: Statistics | None = None,
    progress: Callable[[str, int, int], Callable[[int], None]] | None = None,
    sharding: Sharding = SINGLE,
) -> CompileResult:
    """Compile a recipe for ``model`` on ``calibration`` under ``config``.

    Args:
        model: a stock HF VLM of a supported family.
        processor: its processor.
        calibration: validated calibration samples.
        config: budget, search, scorer.
        format_prompt: the model's chat template for one image and a prompt.
        statistics: reuse statistics from an earlier run (must be from this model and set).
        progress: ``progress(stage, total) -> step`` factory for progress bars; ``step(n)`` advances.
            Under torchrun ``total`` counts this rank's samples only.
        sharding: data-parallel split of the model-in-the-loop stages (see
            :mod:`recipe_compiler.distributed`); every rank returns the same result, byte for
            byte what a single process returns.

    Returns:
        :class:`CompileResult`.

    Raises:
        BudgetError: the budget cannot be met even by dropping every visual token after layer 0.
        StatisticsError: ``statistics`` belong to another model or calibration set.

    Example:
        >>> m = load_model("tiny-llava")                                        # doctest: +SKIP
        >>> result = compile_recipe(m.model, m.processor, load_calibration(), CompileConfig(0.45),
        ...                         format_prompt=m.format_prompt)             # doctest: +SKIP
        >>> result.recipe.save("recipe.safetensors")                            # doctest: +SKIP
    """
    step = progress or (lambda stage, total: (lambda n: None))
    fingerprint = model_fingerprint(model)
    shape = LMShape.from_config(adapter_for(model).text_config(model))
    v_ref = fingerprint["visual_tokens"]
    common = dict(format_prompt=format_prompt, batch_size=config.batch_size, sharding=sharding)
    share = sharding.share(len(calibration), config.batch_size)  # samples this rank runs per pass
    timings: dict[str, float] = {}

    started = time.perf_counter()
    if statistics is None:
        statistics = collect_statistics(
            model, processor, calibration, head_reduce=config.head_reduce,
            progress=step("calibrate", share), prellm_params=config.gprune, **common,
        )
    else:
        _check_statistics(statistics, fingerprint, calibration, config)
    timings["calibrate"] = time.perf_counter() - started

    smallest = min_feasible_budget(shape, statistics.n_other, statistics.n_visual, v_ref)
    if config.pre_llm != "none":
        return _compile_with_stage(
            model, processor, calibration, config, statistics, shape, fingerprint, v_ref, timings, step, share, common
        )
    if config.budget < smallest * (1 - BUDGET_RTOL):
        raise BudgetError(
            f"budget {config.budget:g} cannot be met: even dropping every visual token after layer 0 spends "
            f"{smallest:.4f} of the prefill FLOPs on these prompts; use --budget {math.ceil(smallest * 1000) / 1000:g} or more"
        )

    started = time.perf_counter()
    table = divergence_table(statistics, config.scorer, v_ref=v_ref)
    details: dict[str, Any] = {}
    if config.search in TABLE_SEARCHES:
        costs = cost_table(shape, statistics.n_other, statistics.n_visual, v_ref)
        # The unpruned cost from the same table the search sums, so budget 1.0 admits keep-all exactly.
        budget_flops = config.budget * float(np.sum(costs[:, v_ref]))
        keep = TABLE_SEARCHES[config.search](table, costs, budget_flops)
        search_params = {"method": _SEARCH_METHODS[config.search], "grid": int(v_ref) + 1}
    else:
        from .search.fitprune import fitprune_search

        found = fitprune_search(
            model, processor, calibration, statistics, shape, config.budget, v_ref,
            progress=step("search", 7 * share), **common,
        )
        if found is None:
            raise BudgetError(f"the FitPrune search found no alpha meeting budget {config.budget:g}; try a larger budget or --search optimal")
        keep = found.keep_count
        search_params = {"alpha": found.alpha, "stop_layer": found.stop_layer, "bisection_tol": 0.01}
        details["alpha_trace"] = found.trace
        details["fitprune_pruned_per_layer"] = found.pruned_per_layer.astype(int).tolist()
    timings["search"] = time.perf_counter() - started
    divergence = schedule_objective(table, keep)

    provenance = {
        "budget": config.budget,
        "search": config.search,
        "search_params": search_params,
        "head_reduce": config.head_reduce,
        "divergence": round(float(divergence), 9),
        "calibration": {"fingerprint": calibration.fingerprint(), "samples": len(calibration)},
        "versions": _versions(),
    }
    recipe, verification = _verify(
        lambda prov: Recipe(keep_count=keep, scorer=config.scorer, fingerprint=fingerprint, head_reduce=config.head_reduce, provenance=prov),
        provenance, model, processor, calibration, shape, config, timings, step("verify", share), common,
    )
    equivalent = visual_token_equivalent(shape, statistics.n_other, statistics.n_visual, keep, v_ref)
    return CompileResult(recipe, statistics, verification, float(divergence), float(equivalent), timings, details)


def _compile_with_stage(model, processor, calibration, config, statistics, shape, fingerprint, v_ref, timings, step, share, common):
    """``--pre-llm``: evaluate the stage(s) with the in-LLM schedule, keep the best, verify it."""
    from . import prellm_search

    started = time.perf_counter()
    methods = ("none", "g-prune", "fopru-rank", "fopru-row", "cls-inflection") if config.pre_llm == "auto" else (config.pre_llm,)
    candidates = []
    for method in methods:
        found = prellm_search.evaluate(
            statistics, shape, v_ref, config.budget, method, config.scorer, TABLE_SEARCHES[config.search],
            keep_ratio=config.pre_llm_ratio,
        )
        if method == "cls-inflection":  # one line per stage: its best stage-2 (K, ratio), else its cheapest
            chosen_here = prellm_search.best(found)
            found = [chosen_here or min(found, key=lambda c: c.flops_fraction)]
        candidates.extend(found)
    chosen = prellm_search.best(candidates)
    if chosen is None:
        cheapest = min(c.flops_fraction for c in candidates)
        raise BudgetError(
            f"budget {config.budget:g} cannot be met with --pre-llm {config.pre_llm}: the cheapest candidate spends "
            f"{cheapest:.4f} of the prefill FLOPs; use --budget {math.ceil(cheapest * 1000) / 1000:g} or more"
        )
    timings["search"] = time.perf_counter() - started
    keep = chosen.keep.astype(np.int32)
    search_params = {
        "method": "cls-inflection-grid" if chosen.method == "cls-inflection" else _SEARCH_METHODS[config.search],
        "grid": int(v_ref) + 1,
        "pre_llm": config.pre_llm,
    }
    provenance = {
        "budget": config.budget,
        "search": config.search,
        "search_params": search_params,
        "head_reduce": config.head_reduce,
        "divergence": round(float(chosen.divergence), 9),
        "calibration": {"fingerprint": calibration.fingerprint(), "samples": len(calibration)},
        "versions": _versions(),
    }

    def build(prov):
        return Recipe(keep_count=keep, scorer=chosen.scorer, fingerprint=fingerprint, head_reduce=config.head_reduce,
                      pre_llm=chosen.pre_llm, provenance=prov)

    recipe, verification = _verify(build, provenance, model, processor, calibration, shape, config, timings, step("verify", share), common)
    n_post = None
    if chosen.method != "none":
        n_post = prellm_search.survivors(statistics, chosen.method, chosen.keep_ratio).sum(axis=1)
    equivalent = visual_token_equivalent(shape, statistics.n_other, statistics.n_visual, keep, v_ref, n_survivors=n_post)
    details = {"pre_llm_candidates": candidates, "pre_llm_chosen": chosen,
               "pre_llm_table": prellm_search.format_candidates(candidates, chosen)}
    return CompileResult(recipe, statistics, verification, float(chosen.divergence), float(equivalent), timings, details)


def _verify(build, provenance, model, processor, calibration, shape, config, timings, progress, common):
    """Run the real runtime on the calibration set, refuse an over-budget result, record what it did.

    ``build(provenance) -> Recipe``; returns the recipe with the measured figures in its provenance.
    """
    started = time.perf_counter()
    verification = verify_recipe(model, processor, calibration, build(provenance), shape, progress=progress, **common)
    timings["verify"] = time.perf_counter() - started
    if verification.flops_fraction > config.budget * (1 + BUDGET_RTOL):
        raise RuntimeError(
            f"internal error: the verified FLOPs fraction {verification.flops_fraction:.6f} exceeds the budget "
            f"{config.budget}; please report this with the command line"
        )
    provenance.update(
        flops_fraction=round(verification.flops_fraction, 9),
        kl=round(verification.kl, 9),
        top1_agreement=round(verification.top1_agreement, 9),
    )
    return build(provenance), verification


def _check_statistics(stats: Statistics, fingerprint: dict, calibration: CalibrationSet, config: CompileConfig) -> None:
    theirs = json.loads(stats.model_fingerprint) if stats.model_fingerprint else {}
    if theirs != fingerprint:
        raise StatisticsError("the saved statistics were collected on a different model; recollect them without --stats")
    if stats.calibration_fingerprint != calibration.fingerprint():
        raise StatisticsError("the saved statistics were collected on a different calibration set or --samples; recollect them")
    if config.pre_llm in ("g-prune", "auto") and stats.prellm:
        from runtime.prellm_stage import GPRUNE_DEFAULTS

        wanted = json.dumps({**GPRUNE_DEFAULTS, **(config.gprune or {})}, sort_keys=True)
        if stats.prellm_params != wanted:
            raise StatisticsError(f"the saved statistics hold G-Prune scores for {stats.prellm_params or 'unknown parameters'}, not {wanted}; recollect them")
    if stats.head_reduce != config.head_reduce:
        raise StatisticsError(f"the saved statistics use head_reduce={stats.head_reduce!r}, not {config.head_reduce!r}")


def _versions() -> dict:
    from importlib import metadata

    versions = {}
    for package in ("recipe-compiler", "torch", "transformers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "unknown"
    return versions

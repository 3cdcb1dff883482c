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

from runtime.families import family_for, model_fingerprint
from runtime.methods.detectors import DETECTORS
from runtime.methods.heads import HEAD_REDUCTIONS
from runtime.methods.scorers import SCORERS
from runtime.methods.stages import NO_STAGE, STAGES
from runtime.prellm_stage import supported_methods, unsupported_reason
from runtime.recipe import Recipe

from .calibration import CalibrationSet
from .collect import collect_statistics
from .distributed import SINGLE, Sharding
from .divergence import divergence_table, nested_divergence, schedule_objective
from .errors import BudgetError, StatisticsError
from . import prellm_search
from .families import lm_shape
from .flops import LMShape, cost_table, min_feasible_budget, probe_flops, probe_table, visual_token_equivalent
from .prellm_search import AUTO, pre_llm_choices
from .search import SEARCHES
from .statistics import Statistics
from .verify import Verification, next_token_kl, verify_recipe

# Verified FLOPs fractions are compared with the budget up to floating-point summation order only.
BUDGET_RTOL = 1e-9


OBJECTIVES = {"text+visual": "all", "text": "text"}
"""Search objective (``--objective``) → the query rows its calibration statistics need."""


DEFAULT_PRE_LLM = AUTO
"""The pre-LLM stage a table search compiles with when none is named.

Why ``auto`` and not ``none``: on the trained testbed (1,000 held-out questions, 90.0 % unpruned),
the in-LLM schedule alone kept 84.3 % at budget 0.45 and 63.3 % at 0.2, while ``auto`` (which also
weighs ``none``) kept 88.9 % and 87.7 % at 0.45 and 0.3: a stage lets every layer, layer 0 included,
run on fewer tokens, which an in-LLM cut (after a layer's attention rows) cannot.
"""


def default_pre_llm(search: str) -> str:
    """``CompileConfig.pre_llm``'s default for ``search``: :data:`DEFAULT_PRE_LLM` for a table
    search, ``none`` for a model-in-the-loop or peer search (they cannot compare stages).

    Example:
        >>> default_pre_llm("optimal"), default_pre_llm("fastv")
        ('auto', 'none')
    """
    method = SEARCHES[search]
    return NO_STAGE if method.in_the_loop or method.is_method else DEFAULT_PRE_LLM


@dataclass(frozen=True)
class CompileConfig:
    """What to compile. Validated on construction; each error names the bad value and the range.

    Args:
        budget: fraction of the unpruned language-model prefill FLOPs the pruned model may spend,
            averaged over the calibration prompts; ``0 < budget <= 1``.
        search: schedule search, a :data:`recipe_compiler.search.SEARCHES` name; a peer method's
            search (``fastv``, ``pdrop``, …) compiles that method at the budget.
        scorer: run-time scorer recorded in the recipe, a ``runtime.methods.scorers.SCORERS`` name;
            default (None): a peer search's own scorer, else ``fitprune``.
        head_reduce: a ``runtime.methods.heads.HEAD_REDUCTIONS`` name: "max" (FitPrune) or "mean" over
            attention heads; default (None): the scorer's own (``last-token``: mean, as FastV and PyramidDrop).
        search_params: a peer method's settings (``--search-param``), validated by its search; after
            construction, every setting with its default filled in.
        batch_size: calibration samples per forward.
        pre_llm: pre-LLM stage, one of ``prellm_search.pre_llm_choices()``; ``auto`` evaluates every
            stage (and none) with the in-LLM schedule, takes each stage's least-divergence schedule in
            budget, runs them on the calibration set and keeps the least next-token KL.
            Default (None): ``auto`` with a table search (``optimal``, ``gsearch``, …), ``none`` with
            a model-in-the-loop or peer search, which cannot compare stages (:data:`DEFAULT_PRE_LLM`).
        pre_llm_ratio: fix a fixed-ratio stage's keep ratio instead of trying a grid.
        gprune: G-Prune ``threshold`` / ``temperature`` / ``steps`` overrides (defaults 0.5, 0.03, 5).
        fopru_feature_layer: vision-encoder layer whose attention FoPru reads (HF
            ``vision_feature_layer`` convention, negative allowed; default: the model's).
        inflection_detector: ``cls-inflection``'s knee detector, ``kneedle`` (default) or
            ``max-curvature``.
        objective: the attention distributions whose lost mass the search minimises (an
            :data:`OBJECTIVES` name): ``text+visual`` (default; the text queries' and the visual
            queries' attention to the image, as FitPrune) or ``text`` (the text queries' alone: the
            calibration pass then computes no visual query row, so it costs about a plain forward;
            needs a scorer that ranks without them, e.g. ``text-mean`` or ``last-token``).

    Example:
        >>> CompileConfig(budget=0.45).search
        'optimal'
    """

    budget: float
    search: str = "optimal"
    scorer: str | None = None
    head_reduce: str | None = None
    batch_size: int = 4
    pre_llm: str | None = None
    pre_llm_ratio: float | None = None
    gprune: dict | None = None
    fopru_feature_layer: int | None = None
    inflection_detector: str | None = None
    search_params: dict | None = None
    objective: str = "text+visual"

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
        if self.pre_llm is None:
            object.__setattr__(self, "pre_llm", default_pre_llm(self.search))
        self._resolve_method()
        if self.head_reduce not in HEAD_REDUCTIONS:
            raise ValueError(f"head_reduce {self.head_reduce!r} is unknown; choose one of {', '.join(HEAD_REDUCTIONS)}")
        if self.pre_llm not in pre_llm_choices():
            raise ValueError(f"pre-LLM stage {self.pre_llm!r} is unknown; choose one of {', '.join(pre_llm_choices())}")
        search = SEARCHES[self.search]
        stage = STAGES.get(self.pre_llm)
        fixed = ", ".join(name for name, s in STAGES.items() if s.fixed_ratio)
        if search.in_the_loop and self.pre_llm == AUTO:
            raise ValueError(f"--pre-llm auto compares the stages on the statistics with a table search; with --search {self.search} "
                             "name one fixed-ratio stage and its ratio (e.g. --pre-llm g-prune --pre-llm-ratio 0.5), or use --search optimal")
        if search.in_the_loop and stage is not None and stage.own_schedule:
            raise ValueError(f"--pre-llm {self.pre_llm} brings its own in-LLM cut (layer K and ratio, searched on a grid with the "
                             f"{stage.stage2_scorer} scorer), so a {search.title} schedule has no place in it; use --search optimal with it, or a "
                             f"fixed-ratio stage ({fixed}) with --search {self.search}")
        if search.in_the_loop and self.pre_llm != NO_STAGE and self.pre_llm_ratio is None:
            raise ValueError(f"--pre-llm {self.pre_llm} with --search {self.search} needs --pre-llm-ratio (the model-in-the-loop "
                             "search runs for one ratio; a table search such as --search optimal tries a grid of ratios)")
        if self.pre_llm_ratio is not None:
            r = self.pre_llm_ratio
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1:
                raise ValueError(f"pre-LLM keep ratio must be a number in (0, 1], got {r!r}")
            if stage is None or not stage.fixed_ratio:
                raise ValueError(f"a pre-LLM keep ratio needs a fixed-ratio stage ({fixed}), not {self.pre_llm!r}")
        gprune = STAGES["g-prune"]
        for key, value in (self.gprune or {}).items():
            if not gprune.param_ok(key, value):
                raise ValueError(f"G-Prune parameter {key}={value!r} is unknown or out of range "
                                 "(threshold in [-1, 1], temperature > 0, steps a non-negative integer)")
        layer = self.fopru_feature_layer
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int) or layer == 0):
            raise ValueError(f"--fopru-feature-layer must be a non-zero integer (HF vision_feature_layer convention), got {layer!r}")
        self._check_applies("--fopru-feature-layer", layer, "feature_layer")
        if self.inflection_detector is not None and self.inflection_detector not in DETECTORS:
            raise ValueError(f"inflection detector {self.inflection_detector!r} is unknown; choose one of {', '.join(DETECTORS)}")
        self._check_applies("--inflection-detector", self.inflection_detector, "inflection_detector")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective {self.objective!r} is unknown; choose one of {', '.join(OBJECTIVES)}")
        if self.objective == "text":
            if SCORERS[self.scorer].needs_visual_rows:
                raise ValueError(f"--objective text collects no visual query rows, but the {self.scorer} scorer ranks by them; "
                                 "use --scorer text-mean or --scorer last-token with it, or --objective text+visual")
            if search.needs_visual_rows:
                raise ValueError(f"--objective text collects no visual query rows, but --search {self.search} weighs them; "
                                 "use a table search (--search optimal) with it, or --objective text+visual")

    @property
    def statistics_rows(self) -> str:
        """The query rows the calibration pass probes for this objective (``collect_statistics(rows=)``)."""
        return OBJECTIVES[self.objective]

    def _resolve_method(self) -> None:
        """Fill the scorer, head reduction and peer settings from the search and scorer definitions."""
        search = SEARCHES[self.search]
        scorer = self.scorer if self.scorer is not None else (search.scorer or "fitprune")
        if scorer not in SCORERS:
            raise ValueError(f"scorer {scorer!r} is unknown; choose one of {', '.join(SCORERS)}")
        if search.is_method and scorer != search.scorer:
            raise ValueError(f"--search {self.search} ranks with its own scorer {search.scorer!r}, not {scorer!r}; "
                             f"drop --scorer, or use --search optimal to plan a schedule for the {scorer} scorer")
        owner = SCORERS[scorer].method
        if owner is not None and owner != self.search:
            raise ValueError(f"scorer {scorer!r} is {SEARCHES[owner].title}'s ranking and comes with its schedule: "
                             f"use --search {owner}")
        if search.is_method and self.pre_llm != NO_STAGE:
            raise ValueError(f"--search {self.search} compiles {search.title} alone; it takes no --pre-llm stage (got {self.pre_llm!r})")
        object.__setattr__(self, "scorer", scorer)
        if self.head_reduce is None:
            object.__setattr__(self, "head_reduce", SCORERS[scorer].head_reduce)
        object.__setattr__(self, "search_params", search.resolve_params(self.search_params))

    def _check_applies(self, option: str, value: object, param: str) -> None:
        """A stage option given with ``--pre-llm`` set to a stage that has no such parameter is an error."""
        takers = [name for name, s in STAGES.items() if param in (*s.score_params, *s.selection_params)]
        if value is not None and self.pre_llm not in (*takers, AUTO):
            raise ValueError(f"{option} applies to --pre-llm {STAGES.choices([*takers, AUTO])}, not {self.pre_llm!r}")


@dataclass
class CompileResult:
    """A compiled recipe and what was measured on the way.

    Attributes:
        recipe: the :class:`runtime.Recipe`; ``recipe.save(path)`` writes it.
        statistics: the calibration statistics (reusable with ``--stats``).
        verification: what the recipe really did on the calibration samples.
        divergence: the search objective (separable attention divergence) of the chosen schedule.
        nested_divergence: the divergence of what the runtime executes for that schedule, on the
            calibration statistics (:func:`~recipe_compiler.divergence.nested_divergence`): the
            prediction ``verification.divergence`` (the sets the runtime really kept) is checked
            against.
        visual_token_equivalent: constant visual-token count with the same FLOPs.
        timings: seconds per stage ("calibrate", "search", "verify"; "select" when `--pre-llm auto` ran its finalists).
        details: search-specific facts (e.g. FitPrune's alpha trace).
    """

    recipe: Recipe
    statistics: Statistics
    verification: Verification
    divergence: float
    visual_token_equivalent: float
    timings: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)
    nested_divergence: float = float("nan")


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
    shape = lm_shape(model)
    v_ref = fingerprint["visual_tokens"]
    common = dict(format_prompt=format_prompt, batch_size=config.batch_size, sharding=sharding)
    share = sharding.share(len(calibration), config.batch_size)  # samples this rank runs per pass
    timings: dict[str, float] = {}

    prellm_params = _prellm_params(model, config)  # refuses an unsupported stage or feature layer before any forward
    reason = SCORERS[config.scorer].unsupported_reason(model)
    if reason:
        raise ValueError(f"--scorer {config.scorer} (--search {config.search}) cannot run on this model: {reason}")
    started = time.perf_counter()
    if statistics is None:
        statistics = collect_statistics(
            model, processor, calibration, head_reduce=config.head_reduce,
            progress=step("calibrate", share), prellm_params=prellm_params, rows=config.statistics_rows, **common,
        )
    else:
        _check_statistics(statistics, fingerprint, calibration, config, prellm_params)
        if config.objective == "text":  # full statistics serve the text objective too: its term alone
            statistics = statistics.text_rows_only()
    timings["calibrate"] = time.perf_counter() - started

    search = SEARCHES[config.search]
    cuts = family_for(model).cut_layers(model)
    if len(cuts) < shape.num_layers - 1 and search.in_the_loop:
        raise ValueError(
            f"--search {config.search} cannot run on this model: it probes and prunes at every layer, but only layers "
            f"{', '.join(map(str, cuts))} follow a layer with attention rows; use a table search (--search optimal)"
        )
    probes = scorer_probes(shape, statistics, config.scorer, v_ref)
    smallest = min_feasible_budget(shape, statistics.n_other, statistics.n_visual, v_ref, min(cuts, default=shape.num_layers),
                                   probes=probes)
    if config.pre_llm != NO_STAGE and not search.in_the_loop:
        return _compile_with_stage(
            model, processor, calibration, config, statistics, shape, fingerprint, v_ref, timings, step, share, common
        )
    if config.pre_llm == NO_STAGE and config.budget < smallest * (1 - BUDGET_RTOL):  # a stage lowers the floor
        raise BudgetError(
            f"budget {config.budget:g} cannot be met: even dropping every visual token after layer {min(cuts, default=shape.num_layers) - 1} spends "
            f"{smallest:.4f} of the prefill FLOPs on these prompts; use --budget {math.ceil(smallest * 1000) / 1000:g} or more",
            smallest_budget=smallest,
        )

    started = time.perf_counter()
    table = divergence_table(statistics, config.scorer, v_ref=v_ref)
    details: dict[str, Any] = {}
    stage, alive = None, None  # a model-in-the-loop search with a fixed-ratio pre-LLM stage: its spec and survivors
    if search.is_method:
        costs = cost_table(shape, statistics.n_other, statistics.n_visual, v_ref)
        budget_flops = config.budget * float(np.sum(costs[:, v_ref]))
        macs = SCORERS[config.scorer].probe_macs
        extra = lambda k: probe_flops(shape, statistics.n_other, statistics.n_visual, k, v_ref, macs,  # noqa: E731
                                      statistics.before_image, statistics.n_text)
        keep, found = search.schedule(table, costs, budget_flops, extra=extra, **config.search_params)
        _check_cuts(search.title, keep, cuts)
        search_params = {"method": search.provenance, **found}
    elif not search.in_the_loop:
        costs = cost_table(shape, statistics.n_other, statistics.n_visual, v_ref)
        # The unpruned cost from the same table the search sums, so budget 1.0 admits keep-all exactly.
        budget_flops = config.budget * float(np.sum(costs[:, v_ref]))
        schedule = with_large_cuts(cut_only_at(search.schedule, cuts, shape.num_layers), v_ref)
        try:
            keep = schedule(table, costs, budget_flops, probes=probes)
        except BudgetError:
            # The floor check above passed, so the budget is at the floor within the stated tolerance;
            # the search's own sum may differ from it in the last bits.
            keep = schedule(table, costs, budget_flops * (1 + BUDGET_RTOL), probes=probes)
        search_params = {"method": search.provenance, "grid": int(v_ref) + 1}
    else:
        if config.pre_llm != NO_STAGE:
            stage, alive = _fixed_stage(config, statistics)
            table = divergence_table(statistics, config.scorer, v_ref=v_ref, survivors=alive)
        keep, search_params, found_details = search.run(
            model, processor, calibration, statistics, shape, config.budget, v_ref,
            progress=step("search", search.passes * share), pre_llm=stage, scorer=config.scorer, **common,
        )
        if stage is not None:
            search_params["pre_llm"] = config.pre_llm
        details.update(found_details)
    timings["search"] = time.perf_counter() - started
    divergence = schedule_objective(table, keep)
    nested = nested_divergence(statistics, config.scorer, np.asarray(keep, dtype=np.int64), v_ref=v_ref, survivors=alive)

    provenance = {
        "budget": config.budget,
        "search": config.search,
        "search_params": search_params,
        "head_reduce": config.head_reduce,
        "objective": config.objective,
        "divergence": round(float(divergence), 9),
        "divergence_nested": round(float(nested), 9),
        "calibration": {"fingerprint": calibration.fingerprint(), "samples": len(calibration)},
        "versions": _versions(),
    }
    recipe, verification = _verify(
        lambda prov: Recipe(keep_count=keep, scorer=config.scorer, fingerprint=fingerprint, head_reduce=config.head_reduce,
                            provenance=prov, **({"pre_llm": stage} if stage is not None else {})),
        provenance, model, processor, calibration, shape, config, timings, step("verify", share), common, statistics,
    )
    equivalent = visual_token_equivalent(shape, statistics.n_other, statistics.n_visual, keep, v_ref,
                                         n_survivors=None if alive is None else alive.sum(axis=1))
    return CompileResult(recipe, statistics, verification, float(divergence), float(equivalent), timings, details, float(nested))


def scorer_probes(shape: LMShape, statistics: Statistics, scorer: str, v_ref: int, n_visual: Any = None) -> np.ndarray:
    """The run-time scorer's probe FLOPs per cut on the calibration prompts (:func:`~recipe_compiler.flops.probe_table`).

    Args:
        shape, statistics, v_ref: the model's sizes, the calibration statistics, the reference count.
        scorer: a ``SCORERS`` name.
        n_visual: visual tokens per sample that the schedule scales with (a pre-LLM stage's
            survivors); default: the statistics' own.

    Returns:
        float64 ``[num_layers, v_ref + 1]``.
    """
    visual = statistics.n_visual if n_visual is None else n_visual
    return probe_table(shape, statistics.n_other, visual, v_ref, SCORERS[scorer].probe_macs, statistics.before_image,
                       statistics.n_text)


MIN_CUT_DROP = 0.02
"""The least share of the reference image's visual tokens a cut after the first one drops.

Every cut costs the runtime a fixed amount of work that FLOPs do not show: its scoring probe's
launch and its softmax, the top-k, the gathers of hidden states, positions and rotary tables, a
mask rebuild (about 2 ms a cut on the mid LLaVA on this CPU, 0.5 % of a pruned prefill). The
searches count the probe's FLOPs, so they still make cuts that drop one token to land on the
budget (576 → 191 → 190 at 0.45): FLOPs-wise a small win, in wall time a loss. Such a cut is folded
into the cut before it (:func:`fold_small_cuts`), which only lowers the FLOPs."""


def fold_small_cuts(keep: Any, min_drop: int) -> np.ndarray:
    """``keep`` with every cut after the first that drops fewer than ``min_drop`` tokens folded into the cut before it.

    The layers between the earlier cut and the small one take the smaller count, so the schedule
    has one cut fewer, runs fewer tokens, and pays one probe fewer: its FLOPs only go down. The
    first cut (from the unpruned count) is never changed.

    Args:
        keep: per-layer non-increasing visual-token counts.
        min_drop: the least tokens a later cut must drop.

    Returns:
        the folded counts (int64).

    Example:
        >>> fold_small_cuts([576, 191, 191, 190, 190], min_drop=12).tolist()
        [576, 190, 190, 190, 190]
        >>> fold_small_cuts([576, 191, 191, 100, 99], min_drop=12).tolist()
        [576, 191, 191, 99, 99]
    """
    out = np.asarray(keep, dtype=np.int64).copy()
    cut_layers = [layer for layer in range(1, len(out)) if out[layer] < out[layer - 1]]
    for previous, layer in zip(reversed(cut_layers[:-1]), reversed(cut_layers[1:])):
        # Latest first: a folded segment takes the count of everything after it up to the next kept cut.
        if out[layer - 1] - out[layer] < min_drop:
            out[previous:layer] = out[layer]
    return out


def with_large_cuts(schedule: Callable, v_ref: int) -> Callable:
    """A table search whose later cuts each drop at least :data:`MIN_CUT_DROP` of ``v_ref`` tokens (at least 2)."""
    min_drop = max(2, math.ceil(MIN_CUT_DROP * v_ref))

    def folded(table: Any, cost: Any, budget_flops: float, **kwargs: Any) -> np.ndarray:
        return fold_small_cuts(schedule(table, cost, budget_flops, **kwargs), min_drop)

    return folded


def cut_only_at(schedule: Callable, cuts: tuple, num_layers: int) -> Callable:
    """A table search that may change the count only on entry to layers ``cuts`` (and keeps layer 0 whole).

    Layers between two cuts form one segment whose divergence and cost rows are summed; the search
    runs on the segments (exact for additive searches: ``optimal`` stays optimal under the constraint)
    and each segment's count is repeated over its layers. With every layer a cut it is ``schedule`` itself.

    Example:
        >>> import numpy as np
        >>> pick = lambda table, cost, budget: np.array([1] + [0] * (len(table) - 1))
        >>> cut_only_at(pick, (2,), 4)(np.zeros((4, 2)), np.zeros((4, 2)), 1.0).tolist()
        [1, 1, 0, 0]
    """
    starts = [0, *sorted(c for c in cuts if 0 < c < num_layers)]
    if len(starts) == num_layers:
        return schedule
    bounds = starts + [num_layers]

    def constrained(table: Any, cost: Any, budget_flops: float, **kwargs: Any) -> np.ndarray:
        fold = lambda t: np.stack([np.sum(np.asarray(t)[a:b], axis=0) for a, b in zip(bounds[:-1], bounds[1:])])  # noqa: E731
        if kwargs.get("probes") is not None:  # a segment is entered by one cut: its first layer's probe
            kwargs["probes"] = np.asarray(kwargs["probes"])[starts]
        keep = np.asarray(schedule(fold(table), fold(cost), budget_flops, **kwargs))
        return np.repeat(keep, np.diff(bounds)).astype(np.int64)

    return constrained


def _check_cuts(title: str, keep: Any, cuts: tuple) -> None:
    """Refuse a peer method's schedule that cuts on entry to a layer after a layer without attention."""
    keep = np.asarray(keep)
    bad = [int(l) for l in np.nonzero(np.diff(keep) < 0)[0] + 1 if int(l) not in set(cuts)]
    if bad:
        raise ValueError(
            f"{title}'s schedule prunes on entry to layer {bad[0]}, after a layer without attention rows to score by; "
            f"on this model it may prune only entering layers {', '.join(map(str, cuts))} (set its layer with --search-param)"
        )


def _fixed_stage(config: CompileConfig, statistics: Statistics) -> tuple[dict, np.ndarray]:
    """The fixed-ratio stage a model-in-the-loop search runs first, as a recipe records it, and its survivors."""
    alive = prellm_search.survivors(statistics, config.pre_llm, config.pre_llm_ratio)
    params = prellm_search.stage_params(statistics, config.pre_llm)  # what its calibration scores were computed with
    return {"method": config.pre_llm, "keep_ratio": config.pre_llm_ratio, "params": params}, alive


def _compile_with_stage(model, processor, calibration, config, statistics, shape, fingerprint, v_ref, timings, step, share, common):
    """``--pre-llm``: evaluate the stage(s) with the in-LLM schedule, keep the best, verify it."""
    started = time.perf_counter()
    methods = (NO_STAGE, *(m for m, s in STAGES.items() if not s.baseline)) if config.pre_llm == AUTO else (config.pre_llm,)
    candidates = []
    for method in methods:
        reason = None if method == NO_STAGE else unsupported_reason(model, method)
        if not reason and method != NO_STAGE and config.pre_llm == AUTO and STAGES[method].statistic not in statistics.prellm:
            reason = "the reused statistics hold none of its scores (collected before it existed): recollect them without --stats to compare it"
        if reason:  # only under auto: a named stage was refused before calibration, or has no scores to be chosen on
            candidates.append(prellm_search.skipped(method, reason))
            continue
        found = prellm_search.evaluate(
            statistics, shape, v_ref, config.budget, method, config.scorer,
            with_large_cuts(cut_only_at(SEARCHES[config.search].schedule, family_for(model).cut_layers(model), shape.num_layers), v_ref),
            keep_ratio=config.pre_llm_ratio, detector=config.inflection_detector or "kneedle",
        )
        if method != NO_STAGE and STAGES[method].own_schedule:  # one line per stage: its best own schedule, else its cheapest
            chosen_here = prellm_search.best(found)
            found = [chosen_here or min(found, key=lambda c: c.flops_fraction)]
        candidates.extend(found)
    chosen = prellm_search.best(candidates)
    timings["search"] = time.perf_counter() - started
    if config.pre_llm == AUTO and chosen is not None:
        chosen = _least_drift(model, processor, calibration, config, fingerprint, prellm_search.finalists(candidates),
                              timings, step, share, common)
    if chosen is None:
        cheapest = min(c.flops_fraction for c in candidates)
        raise BudgetError(
            f"budget {config.budget:g} cannot be met with --pre-llm {config.pre_llm}: the cheapest candidate spends "
            f"{cheapest:.4f} of the prefill FLOPs; use --budget {math.ceil(cheapest * 1000) / 1000:g} or more",
            smallest_budget=cheapest,
        )
    keep = chosen.keep.astype(np.int32)
    survivors = None
    if chosen.method != NO_STAGE:
        survivors = prellm_search.survivors(statistics, chosen.method, chosen.keep_ratio,
                                            chosen.params.get("inflection_detector", "kneedle"))
    nested = nested_divergence(statistics, chosen.scorer, keep.astype(np.int64), v_ref=v_ref, survivors=survivors)
    search_params = {
        "method": f"{chosen.method}-grid" if chosen.method != NO_STAGE and STAGES[chosen.method].own_schedule else SEARCHES[config.search].provenance,
        "grid": int(v_ref) + 1,
        "pre_llm": config.pre_llm,
    }
    if chosen.kl is not None:  # auto: the finalists' measured drift chose the stage
        search_params["pre_llm_selection"] = "calibration-kl"
    provenance = {
        "budget": config.budget,
        "search": config.search,
        "search_params": search_params,
        "head_reduce": config.head_reduce,
        "objective": config.objective,
        "divergence": round(float(chosen.divergence), 9),
        "divergence_nested": round(float(nested), 9),
        "calibration": {"fingerprint": calibration.fingerprint(), "samples": len(calibration)},
        "versions": _versions(),
    }

    def build(prov):
        return Recipe(keep_count=keep, scorer=chosen.scorer, fingerprint=fingerprint, head_reduce=config.head_reduce,
                      pre_llm=chosen.pre_llm, provenance=prov)

    recipe, verification = _verify(build, provenance, model, processor, calibration, shape, config, timings, step("verify", share),
                                   common, statistics)
    n_post = None if survivors is None else survivors.sum(axis=1)
    equivalent = visual_token_equivalent(shape, statistics.n_other, statistics.n_visual, keep, v_ref, n_survivors=n_post)
    details = {"pre_llm_candidates": candidates, "pre_llm_chosen": chosen,
               "pre_llm_table": prellm_search.format_candidates(candidates, chosen)}
    return CompileResult(recipe, statistics, verification, float(chosen.divergence), float(equivalent), timings, details, float(nested))


def _least_drift(model, processor, calibration, config, fingerprint, finalists, timings, step, share, common):
    """``--pre-llm auto``: each stage's least-divergence schedule, run on the calibration set; the
    least next-token KL wins (ties: the earlier, simpler stage). Sets each finalist's ``kl``."""
    if len(finalists) == 1:
        return finalists[0]
    started = time.perf_counter()
    recipes = [Recipe(keep_count=c.keep.astype(np.int32), scorer=c.scorer, fingerprint=fingerprint, head_reduce=config.head_reduce,
                      pre_llm=c.pre_llm) for c in finalists]
    kls = next_token_kl(model, processor, calibration, recipes, progress=step("select", share), **common)
    for candidate, kl in zip(finalists, kls):
        candidate.kl = float(kl)
    timings["select"] = time.perf_counter() - started
    return finalists[int(np.argmin(kls))]


def _verify(build, provenance, model, processor, calibration, shape, config, timings, progress, common, statistics):
    """Run the real runtime on the calibration set, refuse an over-budget result, record what it did.

    ``build(provenance) -> Recipe``; returns the recipe with the measured figures in its provenance,
    the realised divergence of the sets the runtime kept (on ``statistics``) among them.
    """
    started = time.perf_counter()
    verification = verify_recipe(model, processor, calibration, build(provenance), shape, progress=progress,
                                 statistics=statistics, **common)
    timings["verify"] = time.perf_counter() - started
    if verification.flops_fraction > config.budget * (1 + BUDGET_RTOL):
        raise RuntimeError(
            f"internal error: the verified FLOPs fraction {verification.flops_fraction:.6f} exceeds the budget "
            f"{config.budget}; please report this with the command line"
        )
    provenance.update(
        divergence_verified=round(float(verification.divergence), 9),
        flops_fraction=round(verification.flops_fraction, 9),
        kl=round(verification.kl, 9),
        top1_agreement=round(verification.top1_agreement, 9),
    )
    return build(provenance), verification


def _prellm_params(model: Any, config: CompileConfig) -> dict:
    """The calibration pass's pre-LLM parameters; ValueError (one line) if the model cannot run the stage."""
    if config.pre_llm not in (NO_STAGE, AUTO) and unsupported_reason(model, config.pre_llm):
        raise ValueError(unsupported_reason(model, config.pre_llm))
    params = dict(config.gprune or {})
    readers = [name for name, stage in STAGES.items() if "feature_layer" in stage.score_params]
    if set(readers) & set(supported_methods(model)):  # always explicit, so reused statistics are checked against it
        params["feature_layer"] = family_for(model).resolve_feature_layer(model, config.fopru_feature_layer, name="--fopru-feature-layer")
    elif config.fopru_feature_layer is not None:
        raise ValueError(unsupported_reason(model, readers[0]))
    return params


def _check_statistics(stats: Statistics, fingerprint: dict, calibration: CalibrationSet, config: CompileConfig,
                      prellm_params: dict | None = None) -> None:
    theirs = json.loads(stats.model_fingerprint) if stats.model_fingerprint else {}
    if theirs != fingerprint:
        raise StatisticsError("the saved statistics were collected on a different model; recollect them without --stats")
    if stats.calibration_fingerprint != calibration.fingerprint():
        raise StatisticsError("the saved statistics were collected on a different calibration set or --samples; recollect them")
    stages = [s for s in STAGES.values() if not s.baseline] if config.pre_llm == AUTO else [STAGES[config.pre_llm]] if config.pre_llm in STAGES else []
    recorded = json.loads(stats.prellm_params) if stats.prellm_params else {}
    for stage in stages:  # the scores a stage would be chosen on must be what it would compute now
        if stage.statistic in stats.prellm:
            mismatch = stage.statistics_mismatch(recorded, prellm_params or {})
            if mismatch:
                raise StatisticsError(mismatch)
    if stats.head_reduce != config.head_reduce:
        raise StatisticsError(f"the saved statistics use head_reduce={stats.head_reduce!r}, not {config.head_reduce!r}")
    if stats.text_only and config.objective != "text":
        raise StatisticsError(f"the saved statistics are text-only (collected for --objective text); --objective {config.objective} "
                              "also needs the visual query rows: recollect them without --stats, or pass --objective text")


def _versions() -> dict:
    from importlib import metadata

    versions = {}
    for package in ("recipe-compiler", "torch", "transformers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "unknown"
    return versions

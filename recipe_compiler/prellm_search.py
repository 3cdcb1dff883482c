"""Choose a pre-LLM stage together with the in-LLM schedule (METHODS.md §4–5).

Pure numpy + the runtime's pure scorers. For a stage and a keep ratio, each calibration sample's
survivors follow from the pre-LLM scores recorded in the calibration pass (exactly as the runtime
selects them); the in-LLM divergence table is restricted to the survivors (the pre-dropped tokens'
mass counts as lost at every layer) and the FLOPs table counts only the survivors from layer 0 on.
Fixed-ratio stages try a small grid of ratios, each with the requested table search for the rest;
``cls-inflection`` (a per-image count at the knee) tries every stage-2 layer ``K`` and keep ratio
on a grid with its stage-2 scorer (any stage with ``own_schedule``). ``auto`` (the default with a table search) evaluates every stage the model supports
and ``none`` (unsupported stages are listed as skipped, with the reason), takes each stage's least-divergence
schedule within the budget as a finalist (:func:`finalists`), and the compiler keeps the finalist whose
pruned model drifts least from the unpruned one on the calibration set (next-token KL, measured).
Each view (LLaVA-NeXT: base and high-res; one per image elsewhere) is selected on its own.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from runtime.methods.scorers import SCORERS
from runtime.methods.stages import NO_STAGE, STAGES
from runtime.prellm_stage import view_keep

from .divergence import divergence_table, schedule_objective
from .errors import StatisticsError
from .flops import LMShape, cost_table, cut_flops, probe_table
from .statistics import Statistics

AUTO = "auto"
"""``--pre-llm auto``: evaluate every stage the model supports, and none; the least measured drift wins."""


def pre_llm_choices() -> tuple[str, ...]:
    """``--pre-llm`` values: no stage, every registered stage, ``auto``."""
    return (NO_STAGE, *STAGES, AUTO)


RATIO_GRID = (0.75, 0.5, 0.375, 0.25, 0.125)
STAGE2_RATIO_GRID = (1.0, 0.75, 0.5, 0.25, 0.125, 0.0)


@dataclass
class Candidate:
    """One evaluated (stage, ratio, schedule): ``feasible`` when its FLOPs fit the budget."""

    method: str
    keep_ratio: float | None  # None for cls-inflection (dynamic count)
    keep: np.ndarray | None
    flops_fraction: float
    divergence: float
    scorer: str
    params: dict = field(default_factory=dict)
    mean_survivors: float = 0.0
    feasible: bool = True
    skipped: str = ""  # why the model cannot run this stage (--pre-llm auto lists it, unevaluated)
    kl: float | None = None  # measured next-token KL on the calibration set (auto's finalists only)

    @property
    def pre_llm(self) -> dict:
        if self.method == NO_STAGE:
            return {"method": NO_STAGE}
        if not STAGES[self.method].fixed_ratio:
            return {"method": self.method, "params": dict(self.params)}
        return {"method": self.method, "keep_ratio": self.keep_ratio, "params": dict(self.params)}


def survivors(stats: Statistics, method: str, keep_ratio: float | None, detector: str = "kneedle") -> np.ndarray:
    """bool [S, V]: the tokens the runtime's stage keeps for each calibration sample.

    Each view (``stats.prellm["view"]``; statistics without it: one square view per sample) is
    selected on its own with the runtime's :func:`runtime.prellm_stage.view_keep`.
    """
    name = STAGES[method].statistic
    if name not in stats.prellm:
        raise StatisticsError(
            f"these statistics hold no {method} scores (an older statistics file, or a model that does not "
            "support this pre-LLM stage); recollect them without --stats, or choose another --pre-llm"
        )
    scores = stats.prellm[name]
    S, V = scores.shape
    out = np.zeros((S, V), dtype=bool)
    for s in range(S):
        n = int(stats.n_visual[s])
        views = stats.prellm["view"][s, :n] if "view" in stats.prellm else np.zeros(n)
        rows = stats.prellm["grid_row"][s, :n] if "grid_row" in stats.prellm else None
        for view in np.unique(views):
            index = np.nonzero(views == view)[0]
            values = torch.from_numpy(np.ascontiguousarray(scores[s, index]))
            if rows is not None:
                height = int(rows[index].max()) + 1
                grid = (height, len(index) // height)
            else:
                side = math.isqrt(len(index))
                grid = (side, side)
            out[s, index] = view_keep(method, values, keep_ratio, grid, detector).numpy()
    return out


def stage_params(stats: Statistics, method: str, detector: str = "kneedle") -> dict:
    """The recipe's ``pre_llm.params`` for ``method``: what its recorded scores were computed with.

    Args:
        stats: calibration statistics (``prellm_params`` holds the G-Prune parameters and the
            FoPru ``feature_layer`` of the recorded scores).
        method: the stage.
        detector: ``cls-inflection``'s knee detector.

    Returns:
        The stage's score parameters as recorded (G-Prune: threshold/temperature/steps; FoPru:
        ``feature_layer``) and its selection parameters (cls-inflection: ``inflection_detector``;
        the caller adds stage 2); ``{}`` for no stage.

    Example:
        >>> stage_params(stats, "fopru-rank")   # doctest: +SKIP
        {'feature_layer': 1}
    """
    if method == NO_STAGE:
        return {}
    recorded = json.loads(stats.prellm_params) if stats.prellm_params else {}
    return STAGES[method].recipe_params(recorded, {"inflection_detector": detector})


def skipped(method: str, reason: str) -> Candidate:
    """A table line for a stage the model cannot run (never chosen).

    Example:
        >>> skipped("cls-inflection", "no CLS token").feasible
        False
    """
    return Candidate(method, None, None, math.nan, math.inf, "", {}, 0.0, False, reason)


def evaluate(
    stats: Statistics,
    shape: LMShape,
    v_ref: int,
    budget: float,
    method: str,
    scorer: str,
    search: Callable,
    keep_ratio: float | None = None,
    detector: str = "kneedle",
) -> list[Candidate]:
    """Every candidate of one stage (all grid points; infeasible ones flagged).

    ``detector`` is ``cls-inflection``'s knee detector (recorded in its candidates' params).
    """
    full = cost_table(shape, stats.n_other, stats.n_visual, v_ref)
    unpruned = float(np.sum(full[:, v_ref]))
    budget_flops = budget * unpruned
    L = shape.num_layers
    out: list[Candidate] = []

    def fraction(costs: np.ndarray, keep: np.ndarray, probes: np.ndarray) -> float:
        return (float(np.sum(costs[np.arange(L), keep])) + cut_flops(probes, keep)) / unpruned

    def probes_for(name: str, n_post: np.ndarray) -> np.ndarray:  # the in-LLM scorer's probe at each cut
        return probe_table(shape, stats.n_other, n_post, v_ref, SCORERS[name].probe_macs, stats.before_image, stats.n_text)

    stage = None if method == NO_STAGE else STAGES[method]
    if stage is not None and stage.own_schedule:  # a stage-2 cut at (layer, ratio) on a grid, by the stage's scorer
        alive = survivors(stats, method, None, detector)
        n_post = alive.sum(axis=1)
        table = divergence_table(stats, stage.stage2_scorer, v_ref=v_ref, survivors=alive)
        costs = cost_table(shape, stats.n_other, n_post, v_ref)
        probes = probes_for(stage.stage2_scorer, n_post)
        for layer in range(1, L):
            for ratio in STAGE2_RATIO_GRID:
                keep = stage.stage2_counts(v_ref, L, layer, ratio).astype(np.int64)
                flops = fraction(costs, keep, probes)
                out.append(Candidate(
                    method, None, keep, flops, schedule_objective(table, keep), stage.stage2_scorer,
                    {"stage2_layer": layer, "stage2_ratio": ratio, **stage_params(stats, method, detector)},
                    float(n_post.mean()), flops <= budget * (1 + 1e-9),
                ))
        return out

    ratios = (keep_ratio,) if keep_ratio is not None else RATIO_GRID
    if stage is None:
        ratios = (1.0,)
    for ratio in ratios:
        alive = None if stage is None else survivors(stats, method, ratio)
        n_post = stats.n_visual if alive is None else alive.sum(axis=1)
        costs = cost_table(shape, stats.n_other, n_post, v_ref)
        probes = probes_for(scorer, n_post)
        smallest = costs[0, v_ref] + float(np.sum(costs[1:, 0])) + (float(probes[1, v_ref]) if L > 1 else 0.0)
        params = stage_params(stats, method)
        if smallest > budget_flops * (1 + 1e-9):
            out.append(Candidate(method, None if stage is None else ratio, None, smallest / unpruned, math.inf,
                                 scorer, params, float(np.mean(n_post)), False))
            continue
        table = divergence_table(stats, scorer, v_ref=v_ref, survivors=alive)
        keep = np.asarray(search(table, costs, budget_flops, probes=probes), dtype=np.int64)
        flops = fraction(costs, keep, probes)
        out.append(Candidate(method, None if stage is None else ratio, keep, flops, schedule_objective(table, keep),
                             scorer, params, float(np.mean(n_post)), flops <= budget * (1 + 1e-9)))
    return out


def best(candidates: list[Candidate]) -> Candidate | None:
    """The feasible candidate with the least divergence (ties: the first, i.e. the simplest stage)."""
    feasible = [c for c in candidates if c.feasible and math.isfinite(c.divergence)]
    return min(feasible, key=lambda c: c.divergence) if feasible else None


def finalists(candidates: list[Candidate]) -> list[Candidate]:
    """Each stage's :func:`best` candidate (``none`` included), in the candidates' order.

    The attention divergence compares the schedules of one stage well (the same tokens, fewer of
    them), but ranks stages against each other by attention mass, which on a trained model
    disagrees with the answers (on the testbed it preferred the in-LLM schedule alone at 0.6, 86.6 %,
    over G-Prune's 90.0 %): ``auto`` measures each finalist's output drift instead.

    Example:
        >>> a, b = Candidate("none", None, None, 0.4, 2.0, "fitprune"), Candidate("g-prune", 0.5, None, 0.4, 1.0, "fitprune")
        >>> [c.method for c in finalists([a, b, Candidate("g-prune", 0.75, None, 0.4, 3.0, "fitprune")])]
        ['none', 'g-prune']
    """
    out = []
    for method in dict.fromkeys(c.method for c in candidates):
        chosen = best([c for c in candidates if c.method == method])
        if chosen is not None:
            out.append(chosen)
    return out


def format_candidates(candidates: list[Candidate], chosen: Candidate | None) -> str:
    """The candidate table ``--pre-llm auto`` prints (one line per stage and ratio; a finalist's
    measured calibration KL in the last column)."""
    measured = any(c.kl is not None for c in candidates)
    lines = ["pre-llm         keep    tokens  flops   divergence  schedule" + ("             kl" if measured else "")]
    for c in candidates:
        if c.skipped:
            lines.append(f"-{c.method:<14} skipped: {c.skipped}")
            continue
        stage = None if c.method == NO_STAGE else STAGES[c.method]
        ratio = "knee" if c.keep_ratio is None and stage is not None and not stage.fixed_ratio else f"{c.keep_ratio if c.keep_ratio is not None else 1.0:.3f}"
        extra = ""
        if stage is not None and stage.own_schedule:
            extra = f"K={c.params['stage2_layer']} ratio={c.params['stage2_ratio']:g}"
        mark = "*" if c is chosen else (" " if c.feasible else "x")
        div = f"{c.divergence:11.4f}" if math.isfinite(c.divergence) else "        inf"
        kl = f"{c.kl:15.4g}" if c.kl is not None else ""
        lines.append(f"{mark}{c.method:<14} {ratio:>6} {c.mean_survivors:8.1f}  {c.flops_fraction:.4f} {div}  {extra:<14}{kl}".rstrip())
    return "\n".join(lines)

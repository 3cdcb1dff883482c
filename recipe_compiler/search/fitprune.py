"""The FitPrune search with the model in the loop (METHODS.md §2, ``fitprune``).

For each alpha of a bisection, every calibration sample runs once with hooks applying the FitPrune
layer-prune-set rule at every layer (on the *pruned* model's attention, against the unpruned
``W``), recording what it pruned and what each layer cost. The reference's layer-major stopping
check ("spent so far + remaining layers at the current count within budget") is then applied after
the fact; this is equivalent because a sample's pruning at layer l depends only on its own history.

Deviation from the reference, on purpose: the reference emits the recipe of the *last evaluated*
alpha, which can miss the budget. We emit the recipe of the last *feasible* alpha, and count an
alpha as feasible only if the emitted recipe itself (floor of the mean pruned counts) also meets
the budget under the exact FLOPs model, the run-time scorer's probe at each of its cuts included.

With a fixed-ratio pre-LLM stage, every forward first applies the stage on entry to layer 0,
exactly as the runtime does. The stage is treated as pruning before layer 0: the rule runs on the
survivors against the same unpruned ``W`` (the mass on all visual tokens, which the rule never
discounts for earlier drops, its own included), the pruned counts are expressed relative to each
sample's survivors (as the recipe's schedule is), and the FLOPs count only the survivors from
layer 0 on. (Anchoring ``W`` to the survivors' share instead lets the renormalised attention of
the pruned model clear the bar at any alpha, so the bisection degenerates to its smallest alpha.)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from runtime.pruner import Policy, PruningHandle, Roles

from runtime.methods.scorers import SCORERS
from runtime.prellm_stage import PreLLMStage

from ..calibration import CalibrationSet
from ..collect import model_inputs
from ..distributed import SINGLE, Sharding, batches_of
from ..errors import BudgetError
from ..flops import LMShape, cost_table, cut_flops, layer_flops, probe_table, schedule_flops_fraction
from ..methods.fitprune import bisect_alpha, layer_prune_set, recipe_from_counts, stopping_layer
from ..statistics import Statistics
from .base import register_search


class FitPruneRulePolicy(Policy):
    """Applies the layer-prune-set rule at every layer; drops take effect entering the next layer.

    With ``stage`` (a ``runtime.prellm_stage.PreLLMStage``), the stage selects on entry to layer
    0 first; the rule's ``W`` stays the unpruned model's mass on *all* visual tokens, as it does
    after the rule's own earlier drops, so what the stage lost leaves the rule less to take.
    """

    def __init__(self, stats: Statistics, alpha: float, num_layers: int, stage: Any = None) -> None:
        self.stats, self.alpha, self.num_layers, self.stage = stats, alpha, num_layers, stage
        self.probe_layers = tuple(range(num_layers - 1))
        self.pruning_layers = tuple(range(0 if stage is not None else 1, num_layers))
        self.head_reduce = stats.head_reduce
        self.sample_ids: Sequence[int] = ()
        self.w_cross, self.w_self = stats.w_cross, stats.w_self
        self.pruned: dict[int, np.ndarray] = {}  # sample -> [L] tokens pruned at the end of each layer
        self.survivors: dict[int, int] = {}  # sample -> visual tokens entering the language model

    def attach(self, model: torch.nn.Module) -> list:
        return self.stage.attach(model) if self.stage is not None else []

    def begin(self, roles: Roles) -> None:
        self._drop: dict[int, torch.Tensor] = {}
        for row, sample in enumerate(self.sample_ids):
            self.pruned[sample] = np.zeros(self.num_layers, dtype=np.int64)
            self.survivors[sample] = int(roles.n_visual_input[row])

    def on_inputs(self, embeds: torch.Tensor, roles: Roles) -> None:
        if self.stage is not None:
            self.stage.on_inputs(embeds)

    def row_groups(self, layer: int, roles: Roles) -> torch.Tensor:
        return torch.stack([roles.text, roles.visual], dim=1).float()

    def on_probe(self, layer: int, sums: torch.Tensor, roles: Roles) -> None:
        drop = torch.zeros_like(roles.visual)
        sums = sums.double().cpu()
        for row, sample in enumerate(self.sample_ids):
            visual = roles.visual[row].cpu()
            n_visual, n_text = int(visual.sum()), int(roles.text[row].sum())
            if n_visual == 0:
                continue
            cross = (sums[row, 0][visual] / max(n_text, 1)).numpy()
            self_scores = (sums[row, 1][visual] / n_visual).numpy()
            pruned = layer_prune_set(cross, self_scores, self.w_cross[sample, layer], self.w_self[sample, layer], self.alpha)
            self.pruned[sample][layer] = len(pruned)
            positions = torch.nonzero(visual).flatten()[torch.as_tensor(pruned, dtype=torch.long)]
            drop[row, positions.to(drop.device)] = True
        self._drop[layer + 1] = drop

    def select(self, layer: int, roles: Roles) -> torch.Tensor:
        if layer == 0 and self.stage is not None:
            kept = self.stage.keep(roles) & roles.visual
            for row, sample in enumerate(self.sample_ids):
                self.survivors[sample] = int(kept[row].sum())
            return kept
        return roles.visual & ~self._drop[layer]


@dataclass
class FitPruneResult:
    keep_count: np.ndarray  # int64 [L], reference visual tokens entering each layer
    alpha: float
    stop_layer: int
    trace: list = field(default_factory=list)  # (alpha, feasible) per evaluation
    pruned_per_layer: np.ndarray | None = None  # the reference's recipe form: pruned at the end of layer l


def fitprune_search(
    model: torch.nn.Module,
    processor: Any,
    calibration: CalibrationSet,
    stats: Statistics,
    shape: LMShape,
    budget: float,
    v_ref: int,
    *,
    format_prompt: Callable[[str], str] = lambda p: p,
    batch_size: int = 4,
    tol: float = 0.01,
    progress: Callable[[int], None] | None = None,
    sharding: Sharding = SINGLE,
    pre_llm: dict | None = None,
    scorer: str = "fitprune",
) -> FitPruneResult | None:
    """Bisect FitPrune's alpha with the model in the loop; return the feasible recipe or None.

    Args:
        model, processor, calibration, format_prompt, batch_size: as for the calibration pass.
        stats: the unpruned statistics (their ``W`` sums anchor the rule).
        shape: the language model's shape for the exact FLOPs model.
        budget: fraction of the unpruned prefill FLOPs (averaged over the calibration prompts).
        v_ref: the model's reference visual-token count (the recipe's unit).
        tol: bisection stops when the alpha bracket is this narrow (0.01 → 7 evaluations).
        progress: called with the number of samples run after each batch.
        sharding: under torchrun, which global batches this rank runs. Token and pruned counts
            are gathered in global sample order, so every rank takes the same bisection step.
        pre_llm: a fixed-ratio pre-LLM stage as a recipe records it (``{"method", "keep_ratio",
            "params"}``), applied first on every forward; the schedule found is relative to
            its survivors and the FLOPs include its saving from layer 0. None: no stage.
        scorer: the run-time scorer of the recipe; its probe at each layer the emitted schedule
            cuts at counts in that schedule's FLOPs (:func:`recipe_compiler.flops.probe_table`).

    Returns:
        :class:`FitPruneResult`, or None if no alpha meets the budget.
    """
    num_layers = shape.num_layers
    unpruned = stats.n_tokens.astype(np.float64)
    budget_flops = budget * float(np.mean(layer_flops(shape, unpruned) * num_layers))
    results: dict[float, tuple[np.ndarray, int]] = {}
    stage_spec = pre_llm if pre_llm and pre_llm.get("method", "none") != "none" else None

    def evaluate(alpha: float) -> bool:
        stage = None
        if stage_spec is not None:
            stage = PreLLMStage(stage_spec["method"], stage_spec.get("keep_ratio", 1.0), stage_spec.get("params", {}))
        policy = FitPruneRulePolicy(stats, alpha, num_layers, stage=stage)
        mine = []
        with PruningHandle(model, policy) as handle, torch.no_grad():
            for index, (start, batch) in sharding.my_batches(list(batches_of(calibration.samples, batch_size))):
                policy.sample_ids = list(range(start, start + len(batch)))
                model(**model_inputs(model, processor, batch, format_prompt), use_cache=False, logits_to_keep=1)
                per_layer = torch.stack(handle.last_request.tokens_per_layer, dim=1).cpu().numpy()
                mine.append((index, (per_layer, [policy.pruned[s] for s in policy.sample_ids],
                                     [policy.survivors[s] for s in policy.sample_ids])))
                if progress is not None:
                    progress(len(batch))
        gathered = sharding.gather(mine)  # every rank: all batches, in global sample order
        tokens = np.concatenate([per_layer for per_layer, _, _ in gathered]).astype(np.float64)
        pruned_rows = [row for _, rows, _ in gathered for row in rows]
        n_post = np.array([n for _, _, counts in gathered for n in counts], dtype=np.int64)
        flops = layer_flops(shape, tokens)  # [S, L]
        spent = np.concatenate([np.zeros((stats.num_samples, 1)), np.cumsum(flops, axis=1)], axis=1)
        entering = np.concatenate([tokens, tokens[:, -1:]], axis=1)
        remaining = layer_flops(shape, entering) * (num_layers - np.arange(num_layers + 1))[None, :]
        stop = stopping_layer(np.stack([spent, remaining], axis=-1), budget_flops)
        if stop is None:
            return False
        pruned = np.stack(pruned_rows).astype(np.float64)
        # Express every sample in reference tokens of what entered the language model (the stage's
        # survivors, or all its visual tokens), as the recipe's schedule scales at run time.
        pruned *= v_ref / (stats.n_visual if stage_spec is None else np.maximum(n_post, 1))[:, None]
        per_layer_pruned = recipe_from_counts(pruned, stop)
        keep = _keep_from_pruned(per_layer_pruned, v_ref)
        if stage_spec is None:
            fraction = schedule_flops_fraction(shape, stats.n_other, stats.n_visual, keep, v_ref)
        else:
            fraction = stage_flops_fraction(shape, stats.n_other, stats.n_visual, n_post, keep, v_ref)
        probes = probe_table(shape, stats.n_other, stats.n_visual if stage_spec is None else n_post, v_ref,
                             SCORERS[scorer].probe_macs, stats.before_image, stats.n_text)
        fraction += cut_flops(probes, keep) / float(np.sum(cost_table(shape, stats.n_other, stats.n_visual, v_ref)[:, v_ref]))
        results[alpha] = (per_layer_pruned, stop)
        return bool(fraction <= budget * (1 + 1e-9))

    alpha, trace = bisect_alpha(evaluate, tol=tol)
    if alpha is None:
        return None
    per_layer_pruned, stop = results[alpha]
    return FitPruneResult(
        keep_count=_keep_from_pruned(per_layer_pruned, v_ref),
        alpha=float(alpha),
        stop_layer=int(stop),
        trace=[(float(a), bool(f)) for a, f in trace],
        pruned_per_layer=per_layer_pruned,
    )


BISECTION_TOL = 0.01
EVALUATIONS = 7  # alpha bisections at BISECTION_TOL: ceil(log2(1 / 0.01))


@register_search("fitprune", in_the_loop=True, title="FitPrune", passes=EVALUATIONS, needs_visual_rows=True)
def run_fitprune(model: torch.nn.Module, processor: Any, calibration: CalibrationSet, stats: Statistics, shape: LMShape,
                 budget: float, v_ref: int, *, progress: Callable[[int], None] | None = None, pre_llm: dict | None = None,
                 scorer: str = "fitprune", **common: Any) -> tuple[np.ndarray, dict, dict]:
    """``--search fitprune``: :func:`fitprune_search`, as the compiler records it.

    Returns:
        ``(keep counts, search_params, details)`` for the recipe's provenance and the result.

    Raises:
        BudgetError: no alpha meets the budget.
    """
    found = fitprune_search(model, processor, calibration, stats, shape, budget, v_ref, tol=BISECTION_TOL,
                            progress=progress, pre_llm=pre_llm, scorer=scorer, **common)
    if found is None:
        raise BudgetError(f"the FitPrune search found no alpha meeting budget {budget:g}; try a larger budget or --search optimal")
    search_params = {"alpha": found.alpha, "stop_layer": found.stop_layer, "bisection_tol": BISECTION_TOL}
    details = {"alpha_trace": found.trace, "fitprune_pruned_per_layer": found.pruned_per_layer.astype(int).tolist()}
    return found.keep_count, search_params, details


def stage_flops_fraction(shape: LMShape, n_other: Any, n_visual: Any, n_post: Any, keep_counts: Any, v_ref: int) -> float:
    """FLOPs fraction of a schedule that runs after a pre-LLM stage (ratio of the means).

    Args:
        shape: the language model's sizes.
        n_other: int ``[S]``, non-visual prompt tokens per sample.
        n_visual: int ``[S]``, visual tokens per sample before the stage (the unpruned cost).
        n_post: int ``[S]``, the stage's survivors per sample; the schedule scales with them.
        keep_counts: int ``[num_layers]``, reference counts relative to the survivors.
        v_ref: reference visual-token count.

    Returns:
        ``mean_s Σ_l layer_flops(n_other + scale(keep[l], n_post)) / mean_s unpruned``.

    Example:
        >>> s = LMShape(num_layers=2, hidden=2, intermediate=3, num_heads=1, num_kv_heads=1, head_dim=2)
        >>> round(stage_flops_fraction(s, [1], [2], [1], [2, 2], v_ref=2), 6)  # 2·160 / (2·252)
        0.634921
    """
    costs = cost_table(shape, n_other, n_post, v_ref)
    full = cost_table(shape, n_other, n_visual, v_ref)
    keep = np.asarray(keep_counts, dtype=np.int64)
    return float(np.sum(costs[np.arange(shape.num_layers), keep])) / float(np.sum(full[:, v_ref]))


def _keep_from_pruned(pruned_per_layer: np.ndarray, v_ref: int) -> np.ndarray:
    """Tokens entering each layer when ``pruned[l]`` go at the end of layer l."""
    keep = v_ref - np.concatenate([[0], np.cumsum(pruned_per_layer)[:-1]])
    return np.clip(keep, 0, v_ref).astype(np.int64)

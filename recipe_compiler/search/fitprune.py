"""The FitPrune search with the model in the loop (METHODS.md §2, ``fitprune``).

For each alpha of a bisection, every calibration sample runs once with hooks applying the FitPrune
layer-prune-set rule at every layer (on the *pruned* model's attention, against the unpruned
``W``), recording what it pruned and what each layer cost. The reference's layer-major stopping
check ("spent so far + remaining layers at the current count within budget") is then applied after
the fact; this is equivalent because a sample's pruning at layer l depends only on its own history.

Deviation from the reference, on purpose: the reference emits the recipe of the *last evaluated*
alpha, which can miss the budget. We emit the recipe of the last *feasible* alpha, and count an
alpha as feasible only if the emitted recipe itself (floor of the mean pruned counts) also meets
the budget under the exact FLOPs model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from runtime.pruner import Policy, PruningHandle, Roles

from ..calibration import CalibrationSet
from ..collect import model_inputs
from ..distributed import SINGLE, Sharding, batches_of
from ..flops import LMShape, layer_flops, schedule_flops_fraction
from ..methods.fitprune import bisect_alpha, layer_prune_set, recipe_from_counts, stopping_layer
from ..statistics import Statistics


class FitPruneRulePolicy(Policy):
    """Applies the layer-prune-set rule at every layer; drops take effect entering the next layer."""

    def __init__(self, stats: Statistics, alpha: float, num_layers: int) -> None:
        self.stats, self.alpha, self.num_layers = stats, alpha, num_layers
        self.probe_layers = tuple(range(num_layers - 1))
        self.pruning_layers = tuple(range(1, num_layers))
        self.head_reduce = stats.head_reduce
        self.sample_ids: Sequence[int] = ()
        self.w_cross, self.w_self = stats.w_cross, stats.w_self
        self.pruned: dict[int, np.ndarray] = {}  # sample -> [L] tokens pruned at the end of each layer

    def begin(self, roles: Roles) -> None:
        self._drop: dict[int, torch.Tensor] = {}
        for sample in self.sample_ids:
            self.pruned[sample] = np.zeros(self.num_layers, dtype=np.int64)

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

    Returns:
        :class:`FitPruneResult`, or None if no alpha meets the budget.
    """
    num_layers = shape.num_layers
    unpruned = stats.n_tokens.astype(np.float64)
    budget_flops = budget * float(np.mean(layer_flops(shape, unpruned) * num_layers))
    results: dict[float, tuple[np.ndarray, int]] = {}

    def evaluate(alpha: float) -> bool:
        policy = FitPruneRulePolicy(stats, alpha, num_layers)
        mine = []
        with PruningHandle(model, policy) as handle, torch.no_grad():
            for index, (start, batch) in sharding.my_batches(list(batches_of(calibration.samples, batch_size))):
                policy.sample_ids = list(range(start, start + len(batch)))
                model(**model_inputs(model, processor, batch, format_prompt), use_cache=False, logits_to_keep=1)
                per_layer = torch.stack(handle.last_request.tokens_per_layer, dim=1).cpu().numpy()
                mine.append((index, (per_layer, [policy.pruned[s] for s in policy.sample_ids])))
                if progress is not None:
                    progress(len(batch))
        gathered = sharding.gather(mine)  # every rank: all batches, in global sample order
        tokens = np.concatenate([per_layer for per_layer, _ in gathered]).astype(np.float64)
        pruned_rows = [row for _, rows in gathered for row in rows]
        flops = layer_flops(shape, tokens)  # [S, L]
        spent = np.concatenate([np.zeros((stats.num_samples, 1)), np.cumsum(flops, axis=1)], axis=1)
        entering = np.concatenate([tokens, tokens[:, -1:]], axis=1)
        remaining = layer_flops(shape, entering) * (num_layers - np.arange(num_layers + 1))[None, :]
        stop = stopping_layer(np.stack([spent, remaining], axis=-1), budget_flops)
        if stop is None:
            return False
        pruned = np.stack(pruned_rows).astype(np.float64)
        pruned *= v_ref / stats.n_visual[:, None]  # express every sample in reference tokens
        per_layer_pruned = recipe_from_counts(pruned, stop)
        keep = _keep_from_pruned(per_layer_pruned, v_ref)
        fraction = schedule_flops_fraction(shape, stats.n_other, stats.n_visual, keep, v_ref)
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


def _keep_from_pruned(pruned_per_layer: np.ndarray, v_ref: int) -> np.ndarray:
    """Tokens entering each layer when ``pruned[l]`` go at the end of layer l."""
    keep = v_ref - np.concatenate([[0], np.cumsum(pruned_per_layer)[:-1]])
    return np.clip(keep, 0, v_ref).astype(np.int64)

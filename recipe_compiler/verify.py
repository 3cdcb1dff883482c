"""The verification pass: run a recipe with the real runtime and measure what it actually does.

FLOPs come from the token counts that really entered each layer (recorded by the runtime's hooks),
not from the plan, plus each pruning layer's scoring probe (:meth:`Scorer.probe_macs`); drift is measured on the next-token distribution at the end of each prompt,
pruned against unpruned. Beside the language-model figures it reports what the vision encoder and
projector cost on the same images (never part of the budget) and the visual-token-only fraction.
Given the calibration statistics of the same samples, it also scores the visual tokens the runtime
really kept at each layer with the search's divergence (the realised divergence, which the
compiler compares with its nested prediction, ``recipe_compiler.divergence.nested_divergence``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from runtime.methods.scorers import SCORERS
from runtime.recipe import Recipe

from .calibration import CalibrationSet
from .collect import model_inputs
from .distributed import SINGLE, Sharding, batches_of
from .families import family_of, vision_shape
from .flops import LMShape, stack_flops, visual_token_fraction
from .statistics import Statistics


@dataclass(frozen=True)
class Verification:
    """What a recipe did on a set of samples.

    Attributes:
        flops_fraction: mean pruned language-model prefill FLOPs / mean unpruned (exact model).
        visual_tokens_per_layer: float [L], mean visual tokens that entered each layer.
        kl: mean KL(unpruned ‖ pruned) of the next-token distribution after the prompt (nats).
        top1_agreement: fraction of samples whose most likely next token is unchanged.
        samples: how many samples were run.
        unpruned_flops: mean unpruned language-model prefill FLOPs per sample.
        vision_flops: mean vision-encoder + projector FLOPs per sample (the same pruned or not;
            a pre-LLM stage drops tokens after the projector), None for a family whose encoder's
            FLOPs are not known.
        visual_token_fraction: the visual tokens' own FLOPs, pruned / unpruned
            (:func:`~recipe_compiler.flops.visual_token_fraction`).
        divergence: with ``statistics`` given, the realised divergence: the search's divergence
            (:func:`~recipe_compiler.divergence.kept_set_divergence`, summed over layers) of the
            visual tokens the runtime really kept entering each layer; else None.
        kept_visual: with ``statistics`` given, bool ``[S, L, V]``: which of each sample's visual
            tokens (in prompt order, the statistics' columns) entered each layer; else None.
    """

    flops_fraction: float
    visual_tokens_per_layer: np.ndarray
    kl: float
    top1_agreement: float
    samples: int
    unpruned_flops: float = float("nan")
    vision_flops: float | None = None
    visual_token_fraction: float = float("nan")
    divergence: float | None = None
    kept_visual: np.ndarray | None = None

    @property
    def vision_share(self) -> float | None:
        """The encoder's share of the unpruned total (encoder + language-model prefill)."""
        if self.vision_flops is None:
            return None
        return self.vision_flops / (self.vision_flops + self.unpruned_flops)

    @property
    def end_to_end_fraction(self) -> float | None:
        """(encoder + pruned prefill) / (encoder + unpruned prefill): the whole prefill's fraction."""
        if self.vision_flops is None:
            return None
        total = self.vision_flops + self.unpruned_flops
        return (self.vision_flops + self.flops_fraction * self.unpruned_flops) / total


def verify_recipe(
    model: torch.nn.Module,
    processor: Any,
    calibration: CalibrationSet,
    recipe: Recipe,
    shape: LMShape,
    *,
    format_prompt: Callable[[str], str] = lambda p: p,
    batch_size: int = 4,
    progress: Callable[[int], None] | None = None,
    sharding: Sharding = SINGLE,
    statistics: Statistics | None = None,
) -> Verification:
    """Run ``recipe`` on ``calibration`` and measure FLOPs and next-token drift.

    Args:
        model, processor, calibration, format_prompt, batch_size: as for the calibration pass.
        recipe: the recipe to check (it must fit ``model``).
        shape: the language model's shape for the exact FLOPs model.
        progress: called with the number of samples finished after each batch.
        sharding: under torchrun, which global batches this rank runs; the per-sample results
            are gathered in global order, so every rank computes the same means.
        statistics: the calibration statistics of these same samples, in the same order (as
            :func:`~recipe_compiler.collect.collect_statistics` returned them); enables
            :attr:`Verification.divergence` and :attr:`Verification.kept_visual`.

    Returns:
        :class:`Verification`.

    Example:
        >>> v = verify_recipe(m.model, m.processor, cal, recipe, LMShape.from_config(cfg))  # doctest: +SKIP
        >>> v.flops_fraction <= 0.45                                                          # doctest: +SKIP
    """
    if statistics is not None and statistics.num_samples != len(calibration.samples):
        raise ValueError(f"statistics hold {statistics.num_samples} samples but the calibration set has "
                         f"{len(calibration.samples)}; pass the statistics collected on this set")
    mine = []
    try:
        vision = vision_shape(model.config)
    except (ValueError, AttributeError, TypeError):  # a family without a known encoder: no vision figure
        vision = None
    for index, (_, batch) in sharding.my_batches(list(batches_of(calibration.samples, batch_size))):
        inputs = model_inputs(model, processor, batch, format_prompt)
        with torch.no_grad():
            full_logits = model(**inputs, use_cache=False, logits_to_keep=1).logits[:, -1].float()
            with recipe.apply(model) as handle:
                pruned_logits = model(**inputs, use_cache=False, logits_to_keep=1).logits[:, -1].float()
                request = handle.last_request
        real_tokens = inputs["attention_mask"].sum(dim=1).cpu().numpy().astype(np.float64)
        if request is not None:
            tokens = torch.stack(request.tokens_per_layer, dim=1).cpu().numpy().astype(np.float64)
            visual = torch.stack(request.visual_per_layer, dim=1).cpu().numpy().astype(np.float64)
            n_visual = request.roles.n_visual_input.cpu().numpy()
        else:  # nothing was pruned (keep-all recipe): every token entered every layer
            tokens = np.repeat(real_tokens[:, None], shape.num_layers, axis=1)
            n_visual = (inputs["input_ids"] == handle.image_token_id).sum(dim=1).cpu().numpy()
            visual = np.repeat(n_visual[:, None].astype(np.float64), shape.num_layers, axis=1)
        probe = np.zeros(tokens.shape[0])
        if request is not None:  # each pruning layer's probe, on the row as it entered the probed layer
            scorer = SCORERS[recipe.scorer]
            before = request.roles.n_before.cpu().numpy().astype(np.float64)
            text = request.roles.text.sum(dim=1).cpu().numpy().astype(np.float64)
            for layer in recipe.pruning_layers:
                probe += 2.0 * np.asarray(scorer.probe_macs(shape, tokens[:, layer - 1], visual[:, layer - 1], before, text),
                                          dtype=np.float64)
        log_p = torch.log_softmax(full_logits, dim=-1)
        log_q = torch.log_softmax(pruned_logits, dim=-1)
        mine.append((index, (
            stack_flops(shape, tokens, visual).sum(axis=1) + probe,
            stack_flops(shape, np.repeat(np.asarray(real_tokens, dtype=np.float64)[:, None], shape.num_layers, axis=1),
                        n_visual.astype(np.float64)[:, None]).sum(axis=1),
            visual,
            _kl(log_p, log_q),
            (full_logits.argmax(-1) == pruned_logits.argmax(-1)).cpu().numpy(),
            n_visual.astype(np.int64),
            None if vision is None else family_of(model.config).vision_flops_per_row(model, inputs, vision, handle.image_token_id),
            None if statistics is None else _kept_visual(handle, model, inputs, request, shape.num_layers),
        )))
        if progress is not None:
            progress(len(batch))
    pruned_flops, full_flops, visual, kls, agree, n_visual, vision_rows, kept_rows = (list(column) for column in zip(*sharding.gather(mine)))
    visual_all = np.concatenate(visual)
    vision_all = None if any(v is None for v in vision_rows) else np.concatenate(vision_rows)
    kept_visual, realised = None, None
    if statistics is not None:
        kept_visual = _stack_kept(statistics, [row for rows in kept_rows for row in rows])
        from .divergence import kept_set_divergence

        realised = float(np.sum(kept_set_divergence(statistics, kept_visual)))
    return Verification(
        flops_fraction=float(np.mean(np.concatenate(pruned_flops)) / np.mean(np.concatenate(full_flops))),
        visual_tokens_per_layer=visual_all.mean(axis=0),
        kl=float(np.mean(np.concatenate(kls))),
        top1_agreement=float(np.mean(np.concatenate(agree))),
        samples=len(calibration.samples),
        unpruned_flops=float(np.mean(np.concatenate(full_flops))),
        vision_flops=None if vision_all is None else float(np.mean(vision_all)),
        visual_token_fraction=visual_token_fraction(shape, np.rint(visual_all), np.concatenate(n_visual)),
        divergence=realised,
        kept_visual=kept_visual,
    )


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> np.ndarray:
    """Per row, KL(p ‖ q) in nats from log-probabilities (rounding below zero clamped to 0)."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1).clamp(min=0).cpu().numpy()


def _kept_visual(handle: Any, model: torch.nn.Module, inputs: dict, request: Any, num_layers: int) -> list[np.ndarray]:
    """Per row, bool ``[L, n_visual]``: which of its visual tokens (prompt order) entered each layer.

    The runtime records, at each pruning layer, the prompt positions of the visual tokens it kept
    (``request.selection``); a set holds until the next pruning layer. The row's visual positions
    are the prunable tokens the runtime itself located (the same family call, the same mask).
    """
    ids = inputs["input_ids"]
    visual = handle.family.prunable_visual_tokens(model, ids, inputs)
    if inputs.get("attention_mask") is not None:
        visual = visual & inputs["attention_mask"].bool()
    selection = {} if request is None else request.selection
    rows = []
    for row in range(ids.shape[0]):
        positions = torch.nonzero(visual[row]).flatten().cpu()
        kept = np.ones((num_layers, positions.numel()), dtype=bool)
        for layer in sorted(selection):
            kept[layer:] = torch.isin(positions, selection[layer][row].cpu()).numpy()
        rows.append(kept)
    return rows


def _stack_kept(statistics: Statistics, rows: list[np.ndarray]) -> np.ndarray:
    """bool ``[S, L, V]`` from per-sample ``[L, n_visual]`` rows, checked against the statistics."""
    S, L, V = statistics.cross.shape
    out = np.zeros((S, L, V), dtype=bool)
    for s, kept in enumerate(rows):
        if kept.shape != (L, int(statistics.n_visual[s])):
            raise ValueError(f"sample {s} has {kept.shape[1]} visual tokens at run time but {int(statistics.n_visual[s])} "
                             "in the statistics; pass the statistics collected on this calibration set")
        out[s, :, : kept.shape[1]] = kept
    return out



def next_token_kl(
    model: torch.nn.Module,
    processor: Any,
    calibration: CalibrationSet,
    recipes: list[Recipe],
    *,
    format_prompt: Callable[[str], str] = lambda p: p,
    batch_size: int = 4,
    progress: Callable[[int], None] | None = None,
    sharding: Sharding = SINGLE,
) -> np.ndarray:
    """Mean KL(unpruned ‖ pruned) of the next-token distribution after each prompt, for several recipes.

    The measure :func:`verify_recipe` reports as :attr:`Verification.kl`, for many recipes at the
    price of one unpruned forward per batch plus one pruned forward per recipe (no FLOPs, no
    statistics): how ``--pre-llm auto`` chooses among its finalists.

    Args:
        model, processor, calibration, format_prompt, batch_size, sharding: as for :func:`verify_recipe`.
        recipes: the recipes to compare (each must fit ``model``).
        progress: called with the number of samples finished after each batch.

    Returns:
        float64 [len(recipes)]: each recipe's mean KL in nats over the calibration samples.

    Example:
        >>> next_token_kl(m.model, m.processor, cal, [recipe_a, recipe_b])  # doctest: +SKIP
        array([0.012, 0.081])
    """
    def log_probs(inputs):
        return torch.log_softmax(model(**inputs, use_cache=False, logits_to_keep=1).logits[:, -1].float(), dim=-1)

    mine = []
    for index, (_, batch) in sharding.my_batches(list(batches_of(calibration.samples, batch_size))):
        inputs = model_inputs(model, processor, batch, format_prompt)
        with torch.no_grad():
            log_p = log_probs(inputs)
            rows = []
            for recipe in recipes:
                with recipe.apply(model):
                    rows.append(_kl(log_p, log_probs(inputs)))
        mine.append((index, np.stack(rows, axis=1) if rows else np.zeros((len(batch), 0))))
        if progress is not None:
            progress(len(batch))
    per_sample = np.concatenate(sharding.gather(mine), axis=0)
    return per_sample.mean(axis=0).astype(np.float64)

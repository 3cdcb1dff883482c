"""The verification pass: run a recipe with the real runtime and measure what it actually does.

FLOPs come from the token counts that really entered each layer (recorded by the runtime's hooks),
not from the plan; drift is measured on the next-token distribution at the end of each prompt,
pruned against unpruned.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from runtime.pruner import PruningHandle
from runtime.recipe import Recipe

from .calibration import CalibrationSet
from .collect import model_inputs
from .distributed import SINGLE, Sharding, batches_of
from .flops import LMShape, layer_flops


@dataclass(frozen=True)
class Verification:
    """What a recipe did on a set of samples.

    Attributes:
        flops_fraction: mean pruned language-model prefill FLOPs / mean unpruned (exact model).
        visual_tokens_per_layer: float [L], mean visual tokens that entered each layer.
        kl: mean KL(unpruned ‖ pruned) of the next-token distribution after the prompt (nats).
        top1_agreement: fraction of samples whose most likely next token is unchanged.
        samples: how many samples were run.
    """

    flops_fraction: float
    visual_tokens_per_layer: np.ndarray
    kl: float
    top1_agreement: float
    samples: int


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
) -> Verification:
    """Run ``recipe`` on ``calibration`` and measure FLOPs and next-token drift.

    Args:
        model, processor, calibration, format_prompt, batch_size: as for the calibration pass.
        recipe: the recipe to check (it must fit ``model``).
        shape: the language model's shape for the exact FLOPs model.
        progress: called with the number of samples finished after each batch.
        sharding: under torchrun, which global batches this rank runs; the per-sample results
            are gathered in global order, so every rank computes the same means.

    Returns:
        :class:`Verification`.

    Example:
        >>> v = verify_recipe(m.model, m.processor, cal, recipe, LMShape.from_config(cfg))  # doctest: +SKIP
        >>> v.flops_fraction <= 0.45                                                          # doctest: +SKIP
    """
    mine = []
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
        else:  # nothing was pruned (keep-all recipe): every token entered every layer
            tokens = np.repeat(real_tokens[:, None], shape.num_layers, axis=1)
            n_visual = (inputs["input_ids"] == handle.image_token_id).sum(dim=1).cpu().numpy()
            visual = np.repeat(n_visual[:, None].astype(np.float64), shape.num_layers, axis=1)
        log_p = torch.log_softmax(full_logits, dim=-1)
        log_q = torch.log_softmax(pruned_logits, dim=-1)
        mine.append((index, (
            layer_flops(shape, tokens).sum(axis=1),
            layer_flops(shape, real_tokens) * shape.num_layers,
            visual,
            (log_p.exp() * (log_p - log_q)).sum(dim=-1).clamp(min=0).cpu().numpy(),
            (full_logits.argmax(-1) == pruned_logits.argmax(-1)).cpu().numpy(),
        )))
        if progress is not None:
            progress(len(batch))
    pruned_flops, full_flops, visual, kls, agree = (list(column) for column in zip(*sharding.gather(mine)))
    return Verification(
        flops_fraction=float(np.mean(np.concatenate(pruned_flops)) / np.mean(np.concatenate(full_flops))),
        visual_tokens_per_layer=np.concatenate(visual).mean(axis=0),
        kl=float(np.mean(np.concatenate(kls))),
        top1_agreement=float(np.mean(np.concatenate(agree))),
        samples=len(calibration.samples),
    )

"""The verification pass: run a recipe with the real runtime and measure what it actually does.

FLOPs come from the token counts that really entered each layer (recorded by the runtime's hooks),
not from the plan; drift is measured on the next-token distribution at the end of each prompt,
pruned against unpruned. Beside the language-model figures it reports what the vision encoder and
projector cost on the same images (never part of the budget) and the visual-token-only fraction.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from runtime.recipe import Recipe

from .calibration import CalibrationSet
from .collect import model_inputs
from .distributed import SINGLE, Sharding, batches_of
from .families import family_of, vision_shape
from .flops import LMShape, layer_flops, visual_token_fraction


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
    """

    flops_fraction: float
    visual_tokens_per_layer: np.ndarray
    kl: float
    top1_agreement: float
    samples: int
    unpruned_flops: float = float("nan")
    vision_flops: float | None = None
    visual_token_fraction: float = float("nan")

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
        log_p = torch.log_softmax(full_logits, dim=-1)
        log_q = torch.log_softmax(pruned_logits, dim=-1)
        mine.append((index, (
            layer_flops(shape, tokens).sum(axis=1),
            layer_flops(shape, real_tokens) * shape.num_layers,
            visual,
            (log_p.exp() * (log_p - log_q)).sum(dim=-1).clamp(min=0).cpu().numpy(),
            (full_logits.argmax(-1) == pruned_logits.argmax(-1)).cpu().numpy(),
            n_visual.astype(np.int64),
            None if vision is None else family_of(model.config).vision_flops_per_row(model, inputs, vision, handle.image_token_id),
        )))
        if progress is not None:
            progress(len(batch))
    pruned_flops, full_flops, visual, kls, agree, n_visual, vision_rows = (list(column) for column in zip(*sharding.gather(mine)))
    visual_all = np.concatenate(visual)
    vision_all = None if any(v is None for v in vision_rows) else np.concatenate(vision_rows)
    return Verification(
        flops_fraction=float(np.mean(np.concatenate(pruned_flops)) / np.mean(np.concatenate(full_flops))),
        visual_tokens_per_layer=visual_all.mean(axis=0),
        kl=float(np.mean(np.concatenate(kls))),
        top1_agreement=float(np.mean(np.concatenate(agree))),
        samples=len(calibration.samples),
        unpruned_flops=float(np.mean(np.concatenate(full_flops))),
        vision_flops=None if vision_all is None else float(np.mean(vision_all)),
        visual_token_fraction=visual_token_fraction(shape, np.rint(visual_all), np.concatenate(n_visual)),
    )


"""Qwen3-VL (``Qwen3VLForConditionalGeneration``, ``model_type == "qwen3_vl"``): Qwen2-VL's layout plus deepstack.

Everything the runtime knows of Qwen2-VL holds (:mod:`runtime.families.qwen2_vl`): ``model.model``
holds ``.visual`` and ``.language_model`` (``Qwen3VLTextModel``), each image is one run of
``<|image_pad|>`` placeholders, M-RoPE (t, h, w) positions of the unpruned prompt reach every layer
as (cos, sin) rows that the pruner gathers, video placeholders are kept, the reference image is 32 × 32
vision patches (512 × 512 px at Qwen3-VL's 16-px patches): 256 tokens. The vision encoder attends
over each frame (no windows, no CLS token), so FoPru's per-patch attention is read as on Qwen2-VL.

**Deepstack.** The vision encoder also returns, per ``deepstack_visual_indexes`` entry, features of
an intermediate block through their own merger; ``Qwen3VLTextModel.forward`` adds the ``i``-th of
them to the visual positions of the hidden states *after* decoder layer ``i``
(``_deepstack_process(hidden, visual_pos_masks, features_i)``), outside every decoder layer and
with the mask of the unpruned prompt. Once a layer has pruned, the hidden states are shorter than
that mask. :meth:`Qwen3VLFamily.pruning_hooks` wraps ``_deepstack_process`` so that the mask and the
features follow the kept tokens: the mask is gathered by the kept prompt index, and each kept
token's feature row is taken by its rank among the unpruned visual positions. So every layer ≥ 1
can prune (the deepstack layers included) and so can a pre-LLM stage (on entry to layer 0). A
dropped token's deepstack features are dropped with it; a feature-merging stage adds the kept
token's own.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..state import InstancePatch
from .base import register_family
from .qwen2_vl import Qwen2VLFamily


def follow_kept(visual_pos_masks: torch.Tensor, visual_embeds: torch.Tensor, index: torch.Tensor,
                valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The deepstack mask and feature rows of a pruned sequence.

    Args:
        visual_pos_masks: (B, L0) bool, the unpruned prompt's visual positions (images and videos).
        visual_embeds: (N, D), one row per True of ``visual_pos_masks``, row-major.
        index: (B, L') the prompt position of each slot of the pruned sequence.
        valid: (B, L') whether the slot holds a real token (not a re-padding dummy).

    Returns:
        ``(mask, rows)``: (B, L') bool, the kept visual slots, and their (n, D) features in the
        row-major order of ``mask``.

    Example:
        >>> m = torch.tensor([[False, True, True, False]])
        >>> mask, rows = follow_kept(m, torch.tensor([[1.0], [2.0]]), torch.tensor([[0, 2, 3]]), torch.ones(1, 3, dtype=torch.bool))
        >>> mask.tolist(), rows.flatten().tolist()
        ([[False, True, False]], [2.0])
    """
    mask = visual_pos_masks.to(index.device).bool()
    rank = (mask.flatten().long().cumsum(0) - 1).view_as(mask)  # each visual position's feature row
    kept = mask.gather(1, index) & valid.to(index.device)
    rows = rank.gather(1, index)[kept]
    return kept, visual_embeds[rows.to(visual_embeds.device)]


@register_family("qwen3_vl")
class Qwen3VLFamily(Qwen2VLFamily):
    """Qwen3-VL: Qwen2-VL's layout and positions; deepstack features follow the kept tokens."""

    vision_fields = Qwen2VLFamily.vision_fields + ("num_position_embeddings", "deepstack_visual_indexes")
    layer_kinds_hint = ""
    vllm_refusal = (
        "Qwen3-VL is not served by the vLLM plugin yet: as for Qwen2-VL its kept tokens need their original M-RoPE (t, h, w) "
        "positions, which vLLM 0.32 does not give pruned tokens, and its deepstack features are added by vLLM's model at "
        "the positions of the unpruned prompt, which the plugin would have to prune with the tokens; serve it with the HF "
        "runtime (runtime.load(recipe).apply(model))"
    )

    def pruning_hooks(self, model: Any, pruned: Callable[[], Any]) -> list:
        """Wrap ``Qwen3VLTextModel._deepstack_process`` so its mask and features follow the kept tokens."""
        language_model = self.language_model(model)
        original = language_model._deepstack_process  # bound: the class's method or a wrapper already there

        def deepstack_process(hidden_states: torch.Tensor, visual_pos_masks: torch.Tensor, visual_embeds: torch.Tensor) -> torch.Tensor:
            now = pruned()
            if now is None or visual_pos_masks is None:
                return original(hidden_states, visual_pos_masks, visual_embeds)
            index, valid = now
            if index.shape != hidden_states.shape[:2]:  # not this forward's sequence: leave it to the model
                return original(hidden_states, visual_pos_masks, visual_embeds)
            mask, rows = follow_kept(visual_pos_masks, visual_embeds, index, valid)
            return original(hidden_states, mask, rows)

        return [InstancePatch(language_model, "_deepstack_process", deepstack_process)]

"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``, ``model_type == "qwen2_5_vl"``).

Everything the runtime knows of Qwen2-VL holds (:mod:`runtime.families.qwen2_vl`): the layout, M-RoPE
positions, the 256-token reference image, image placeholders only. The vision encoder differs: it
reorders the patches of every encoding into windows of ``window_size`` px (in ``merge × merge``
groups, ``get_vision_window_index``), runs every block in that order (outside
``fullatt_block_indexes`` attending only within a window) and puts the merged tokens back in image
order at the end. The attention signal captured at a block is therefore in window order; the family
undoes the permutation with the index the model itself computes from the encoding's
``image_grid_thw`` (:func:`patch_order`), so FoPru rank and row read each patch's significance in
the same order as Qwen2-VL. At a windowed block (FoPru ``feature_layer`` outside
``fullatt_block_indexes``) a patch's significance is the attention it receives from its own window,
averaged over that window's queries; the default, the last block, attends to the whole image.
The encoder has no CLS token, so cls-inflection is refused (as on Qwen2-VL).
"""
from __future__ import annotations

from typing import Any

import torch

from ..errors import StageCannotRun
from .base import Encoded, Signal, View, register_family
from .qwen2_vl import Qwen2VLFamily


def patch_order(model: Any, values: torch.Tensor, grids: list) -> torch.Tensor:
    """Per-patch ``values`` of one encoding, from the encoder's window order back to the image order.

    Args:
        model: a Qwen2.5-VL model (its ``vision_config`` gives merge, window and patch sizes).
        values: (patches,) in the order the vision blocks saw them.
        grids: the encoding's ``image_grid_thw`` rows.

    Returns:
        (patches,) in the processor's (image) order, ``merge × merge`` groups contiguous.

    Raises:
        StageCannotRun: the values do not cover the encoding's patches.
    """
    from transformers.vision_utils import get_vision_window_index

    vision = model.config.vision_config
    merge = int(vision.spatial_merge_size)
    window_index, _ = get_vision_window_index(torch.tensor(grids, dtype=torch.long), spatial_merge_size=merge,
                                              window_size=int(vision.window_size), patch_size=int(vision.patch_size))
    unit = merge * merge
    if values.numel() != window_index.numel() * unit:
        raise StageCannotRun(f"{values.numel()} captured patch signals for {window_index.numel() * unit} patches of the encoding")
    inverse = torch.argsort(window_index).to(values.device)  # window slot of each image-order merge group
    return values.view(-1, unit)[inverse].reshape(-1)


@register_family("qwen2_5_vl")
class Qwen2_5VLFamily(Qwen2VLFamily):
    """Qwen2.5-VL: Qwen2-VL's layout with a window-attention encoder whose patch order is undone."""

    vllm_refusal = Qwen2VLFamily.vllm_refusal.replace("Qwen2-VL", "Qwen2.5-VL", 1)

    def views(self, model: Any, roles: Any, row: int, positions: torch.Tensor, encoded: Encoded, index: int,
              signal: Signal) -> list[View]:
        """Qwen2-VL's views, with the attention signal put back from window order (:func:`patch_order`)."""

        def in_image_order(name: str) -> torch.Tensor | None:
            value = signal(name)
            if name != "attention" or value is None or encoded.layout is None:
                return value
            return patch_order(model, value, encoded.layout)

        return super().views(model, roles, row, positions, encoded, index, in_image_order)

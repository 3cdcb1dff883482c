"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``, ``model_type == "llava_next"``).

Each image becomes one contiguous run of ``<image>`` placeholders, laid out by
``LlavaNextModel.pack_image_features``: the base (thumbnail) crop's ``s×s`` features, then the
unpadded high-resolution grid row by row, **each row followed by one ``image_newline`` token**.
The newline tokens carry the 2D layout, so the runtime never prunes them: they are not in
:meth:`LlavaNextAdapter.prunable_visual_tokens`, they do not count as visual tokens anywhere (keep
counts, statistics, the recipe's unit), and they stay in the sequence like text does. Recipes scale
per image with the image's *prunable* count ``n``: ``round_half_up(keep · n / v_ref)``.

Finding the newlines at prefill:

* plain ``model(**inputs)``: the base model receives ``image_sizes``, and the layout follows from
  the config with transformers' own packing arithmetic (``get_anyres_image_grid_shape`` and
  ``unpad_image``), cached per image size;
* ``model.generate(**inputs)``: transformers 5.x encodes the images *before* prefill and drops
  ``pixel_values`` **and ``image_sizes``** from the prefill call; it passes
  ``mm_encoder_outputs["image"].pooler_output`` (the packed per-image features) instead. There
  the newline rows are exactly ``model.model.image_newline`` (appended, not computed), so they are
  found by equality;
* neither available: every placeholder is treated as prunable, logged once on ``runtime``.
"""
from __future__ import annotations

import functools
import logging
from typing import Any

import torch

from .adapters import LlavaAdapter, register_adapter

logger = logging.getLogger("runtime")
_said: set = set()


def _say_once(reason: str) -> None:
    if reason not in _said:
        _said.add(reason)
        logger.info("recipe runtime (llava_next): %s", reason)


@functools.lru_cache(maxsize=4096)
def image_layout(pinpoints: tuple, crop: int, patch: int, strategy: str, height: int, width: int) -> tuple[int, int, int]:
    """``(base, rows, cols)`` of one packed LLaVA-NeXT image, as ``pack_image_features`` lays it out.

    The image's placeholders are ``base`` base-crop tokens, then ``rows`` rows of ``cols`` grid
    tokens each followed by one newline: ``base + rows · (cols + 1)`` in all.

    Args:
        pinpoints: ``config.image_grid_pinpoints`` as a tuple of (height, width) tuples.
        crop: ``vision_config.image_size`` (the crop side in pixels).
        patch: ``vision_config.patch_size``.
        strategy: ``vision_feature_select_strategy`` ("default" drops CLS; "full" keeps it).
        height, width: the original image size, as the processor reports it in ``image_sizes``.
    """
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    side = crop // patch
    grid_h, grid_w = get_anyres_image_grid_shape([height, width], [list(p) for p in pinpoints], crop)
    rows, cols = unpad_image(torch.empty(0, grid_h * side, grid_w * side), [height, width]).shape[1:]
    return side * side + (1 if strategy == "full" else 0), int(rows), int(cols)


@functools.lru_cache(maxsize=4096)
def _newline_mask(base: int, rows: int, cols: int) -> torch.Tensor:
    mask = torch.zeros(base + rows * (cols + 1), dtype=torch.bool)
    mask[base + cols :: cols + 1] = True
    return mask


def _layout_key(config: Any) -> tuple:
    vision = config.vision_config
    pinpoints = tuple(tuple(int(x) for x in p) for p in config.image_grid_pinpoints)
    strategy = getattr(config, "vision_feature_select_strategy", "default")
    return pinpoints, int(vision.image_size), int(vision.patch_size), strategy


@register_adapter("llava_next")
class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-NeXT / LLaVA-1.6 (anyres): base crop + unpadded high-res grid with row-end newlines."""

    top_fields = LlavaAdapter.top_fields + ("image_grid_pinpoints",)

    def reference_visual_tokens(self, config: Any) -> int:
        """Prunable visual tokens of the reference image: the recipe's unit.

        The reference image has exactly the size of the largest-area grid pinpoint (the first one
        on a tie), so it uses the whole high-resolution grid with no unpadding: for LLaVA-1.6
        that is a 672×672 image, ``576`` base + ``48·48 = 2304`` grid = **2880** tokens (2928
        placeholders with its 48 row-end newlines). Newlines are excluded because they are never
        pruned: the recipe's ``keep_count`` then counts exactly the tokens a reference image keeps,
        in the same unit as the per-image count ``n`` that the runtime and the compiler scale by.
        Computed from the config with the model's own packing arithmetic (no hard-coded numbers).
        """
        pinpoints, crop, patch, strategy = _layout_key(config)
        height, width = max(pinpoints, key=lambda p: p[0] * p[1])  # max() keeps the first of equals
        base, rows, cols = image_layout(pinpoints, crop, patch, strategy, height, width)
        return base + rows * cols

    def prunable_visual_tokens(self, model: torch.nn.Module, input_ids: torch.Tensor, base_kwargs: dict) -> torch.Tensor:
        """Image placeholders except the row-end newline tokens, (B, L) bool.

        Images are matched to placeholders in order (row-major over the batch, exactly as the
        model's ``masked_scatter`` fills them), so any number of images per prompt, images of
        different sizes and left padding all work. Falls back to every placeholder (and logs once)
        when the layout cannot be recovered.
        """
        image = input_ids == self.image_token_id(model)
        total = int(image.sum())
        if total == 0:
            return image
        newline = self._newlines(model, base_kwargs, total)
        if newline is None:
            return image
        prunable = image.clone()
        prunable[image] = ~newline.to(image.device)
        return prunable

    def _newlines(self, model: torch.nn.Module, base_kwargs: dict, total: int) -> torch.Tensor | None:
        """Flat bool over all placeholders of the batch: True where a newline token goes.

        Pre-computed features win over ``image_sizes``: they are what actually fills the
        placeholders (``generate`` passes only them; a caller may also pass re-packed ones).
        """
        encoded = (base_kwargs.get("mm_encoder_outputs") or {}).get("image")
        features = getattr(encoded, "pooler_output", None)
        newline = getattr(self.base_model(model), "image_newline", None)
        image_sizes = base_kwargs.get("image_sizes")
        if features is not None and newline is not None:
            if isinstance(features, torch.Tensor):
                features = [features.reshape(-1, features.shape[-1])]
            found = torch.cat([(f == newline.to(f.device, f.dtype)).all(dim=-1) for f in features])
            source = "the encoded image features"
        elif image_sizes is not None:
            key = _layout_key(model.config)
            sizes = image_sizes.tolist() if hasattr(image_sizes, "tolist") else list(image_sizes)
            masks = [_newline_mask(*image_layout(*key, int(h), int(w))) for h, w in sizes]
            found = torch.cat(masks) if masks else torch.zeros(0, dtype=torch.bool)
            source = "image_sizes"
        else:
            _say_once("no image_sizes or image features reached the model, so row-end newline tokens "
                      "cannot be told apart and may be pruned like any image token")
            return None
        if found.numel() != total:
            _say_once(f"the image layout from {source} gives {found.numel()} tokens but the prompt has {total} "
                      "image placeholders; every placeholder is treated as prunable")
            return None
        return found

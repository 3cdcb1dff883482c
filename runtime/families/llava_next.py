"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``, ``model_type == "llava_next"``): anyres geometry.

Each image becomes one contiguous run of ``<image>`` placeholders, laid out by
``LlavaNextModel.pack_image_features``: the base (thumbnail) crop's ``s×s`` features, then the
unpadded high-resolution grid row by row, **each row followed by one ``image_newline`` token**.
The newline tokens carry the 2D layout, so the runtime never prunes them: they are not in
:meth:`LlavaNextFamily.prunable_visual_tokens`, they do not count as visual tokens anywhere (keep
counts, statistics, the recipe's unit), and they stay in the sequence like text does. Recipes scale
per image with the image's *prunable* count ``n``: ``round_half_up(keep · n / v_ref)``.

The anyres geometry is written here once, with transformers' own arithmetic, and read by the
runtime (newlines, views), the FLOPs model (crops per image, the reference image), verification
and the kept-token pictures: :func:`image_layout`, :func:`image_crops`, :func:`reference_size`,
:func:`view_grids` and :func:`crop_sources`.

Finding the newlines at prefill:

* plain ``model(**inputs)``: the base model receives ``image_sizes``, and the layout follows from
  the config (:func:`image_layout`), cached per image size;
* ``model.generate(**inputs)``: transformers 5.x encodes the images *before* prefill and drops
  ``pixel_values`` **and ``image_sizes``** from the prefill call; it passes
  ``mm_encoder_outputs["image"].pooler_output`` (the packed per-image features) instead. There
  the newline rows are exactly ``model.model.image_newline`` (appended, not computed), so they are
  found by equality;
* neither available: every placeholder is treated as prunable, logged once on ``runtime``.

Pre-LLM views: per image, the base view (crop 0, ``s×s``) and the high-resolution view (the
unpadded grid of the other crops, rows delimited by newlines); encoder patches are mapped to
prompt positions with the model's own ``pack_image_features`` on index-coded dummies
(:func:`crop_sources`), so unpadding is followed exactly. That needs ``image_sizes``, recorded from
the ``get_image_features`` call (``generate()`` drops them from the prefill call).
"""
from __future__ import annotations

import functools
from typing import Any

import torch

from .. import prellm
from ..errors import StageCannotRun
from ..log import logger
from .base import Encoded, Signal, View, register_family
from .llava import LlavaFamily

_said: set = set()


def _say_once(reason: str) -> None:
    if reason not in _said:
        _said.add(reason)
        logger.info("recipe runtime (llava_next): %s", reason)


# ----------------------------------------------------------------------- anyres geometry (pure)
def layout_key(config: Any) -> tuple:
    """``(pinpoints, crop, patch, strategy)`` of a LLaVA-NeXT config, hashable (the geometry's inputs)."""
    vision = config.vision_config
    pinpoints = tuple(tuple(int(x) for x in p) for p in config.image_grid_pinpoints)
    strategy = getattr(config, "vision_feature_select_strategy", "default")
    return pinpoints, int(vision.image_size), int(vision.patch_size), strategy


@functools.lru_cache(maxsize=4096)
def _layout(pinpoints: tuple, crop: int, patch: int, strategy: str, height: int, width: int) -> tuple[int, int, int]:
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    side = crop // patch
    grid_h, grid_w = get_anyres_image_grid_shape([height, width], [list(p) for p in pinpoints], crop)
    rows, cols = unpad_image(torch.empty(0, grid_h * side, grid_w * side), [height, width]).shape[1:]
    return side * side + (1 if strategy == "full" else 0), int(rows), int(cols)


def image_layout(config: Any, height: int, width: int) -> tuple[int, int, int]:
    """``(base, rows, cols)`` of one packed LLaVA-NeXT image, as ``pack_image_features`` lays it out.

    The image's placeholders are ``base`` base-crop tokens, then ``rows`` rows of ``cols`` grid
    tokens each followed by one newline: ``base + rows · (cols + 1)`` in all.

    Args:
        config: a ``LlavaNextConfig``.
        height, width: the original image size, as the processor reports it in ``image_sizes``.

    Example:
        >>> image_layout(nxt.model.config, 300, 451)   # doctest: +SKIP
        (64, 10, 16)
    """
    return _layout(*layout_key(config), int(height), int(width))


@functools.lru_cache(maxsize=4096)
def _crops(pinpoints: tuple, crop: int, height: int, width: int) -> int:
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    return int(image_size_to_num_patches([height, width], [list(p) for p in pinpoints], crop))


def image_crops(config: Any, height: int, width: int) -> int:
    """Crops the vision encoder runs for one image: the base crop plus the anyres grid's crops."""
    pinpoints, crop, _, _ = layout_key(config)
    return _crops(pinpoints, crop, int(height), int(width))


def reference_size(config: Any) -> tuple[int, int]:
    """The family's reference image: exactly the largest-area grid pinpoint (the first one on a tie),
    so it uses the whole high-resolution grid with no unpadding (672×672 for LLaVA-1.6)."""
    pinpoints = layout_key(config)[0]
    return max(pinpoints, key=lambda p: p[0] * p[1])  # max() keeps the first of equals


def view_grids(config: Any, height: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The base-view grid and the unpadded high-resolution grid of one image.

    Returns:
        ``((side, side), (rows, cols))``: the base crop's tokens, then the high-res tokens after
        ``unpad_image`` (each high-res row is followed in the prompt by one newline token, which
        is not part of the grid).

    Example:
        >>> view_grids(nxt.model.config, 300, 451)   # doctest: +SKIP
        ((8, 8), (10, 16))
    """
    _, crop, patch, _ = layout_key(config)
    side = crop // patch
    _, rows, cols = _layout(*layout_key(config)[:3], "default", int(height), int(width))
    return (side, side), (rows, cols)


@functools.lru_cache(maxsize=4096)
def _newline_mask(base: int, rows: int, cols: int) -> torch.Tensor:
    mask = torch.zeros(base + rows * (cols + 1), dtype=torch.bool)
    mask[base + cols :: cols + 1] = True
    return mask


@functools.lru_cache(maxsize=1024)
def _sources(pinpoints: tuple, crop: int, patch: int, size: tuple[int, int]) -> tuple[torch.Tensor, int]:
    from types import SimpleNamespace

    from transformers.models.llava_next.modeling_llava_next import LlavaNextModel

    grid = [list(p) for p in pinpoints]
    crops = _crops(pinpoints, crop, int(size[0]), int(size[1]))
    patches = (crop // patch) ** 2
    owner = SimpleNamespace(config=SimpleNamespace(vision_config=SimpleNamespace(image_size=crop, patch_size=patch), image_grid_pinpoints=grid))
    coded = torch.arange(crops * patches, dtype=torch.float64).view(crops, patches, 1)
    packed, _ = LlavaNextModel.pack_image_features(owner, [coded], [list(size)], "default", image_newline=torch.tensor([-1.0], dtype=torch.float64))
    return packed[0][:, 0].round().long(), crops


def crop_sources(config: Any, size: tuple[int, int]) -> tuple[torch.Tensor, int]:
    """One packed image: per placeholder its encoder patch ``crop·P + p`` or -1 (newline), and the
    image's crop count (unpadding may drop whole crops, so it is not ``max // P + 1``).

    Runs transformers' own ``pack_image_features`` on index-coded dummies, so the unpadding is
    exactly the model's.
    """
    pinpoints, crop, patch, _ = layout_key(config)
    return _sources(pinpoints, crop, patch, (int(size[0]), int(size[1])))


# ----------------------------------------------------------------------- the family
@register_family("llava_next")
class LlavaNextFamily(LlavaFamily):
    """LLaVA-NeXT / LLaVA-1.6 (anyres): base crop + unpadded high-res grid with row-end newlines."""

    top_fields = LlavaFamily.top_fields + ("image_grid_pinpoints",)
    vllm_architecture = "RecipePrunedLlavaNextForConditionalGeneration"

    def reference_visual_tokens(self, config: Any) -> int:
        """Prunable visual tokens of the reference image (:func:`reference_size`): the recipe's unit.

        For LLaVA-1.6 that is a 672×672 image, ``576`` base + ``48·48 = 2304`` grid = **2880**
        tokens (2928 placeholders with its 48 row-end newlines). Newlines are excluded because they
        are never pruned: the recipe's ``keep_count`` then counts exactly the tokens a reference
        image keeps, in the same unit as the per-image count ``n`` that the runtime and the
        compiler scale by. Computed from the config with the model's own packing arithmetic.
        """
        base, rows, cols = image_layout(config, *reference_size(config))
        return base + rows * cols

    def prunable_visual_tokens(self, model: Any, input_ids: torch.Tensor, base_kwargs: dict) -> torch.Tensor:
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

    def _newlines(self, model: Any, base_kwargs: dict, total: int) -> torch.Tensor | None:
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
            sizes = image_sizes.tolist() if hasattr(image_sizes, "tolist") else list(image_sizes)
            masks = self.newline_masks(model.config, sizes, base_kwargs)
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

    def newline_masks(self, config: Any, sizes: list, base_kwargs: dict) -> list[torch.Tensor]:
        """Per image of ``sizes`` (``image_sizes`` rows), bool over its placeholders: True at its newlines."""
        return [_newline_mask(*image_layout(config, int(h), int(w))) for h, w in sizes]

    # ------------------------------------------------------------------ pre-LLM stages
    def image_layout(self, arguments: dict) -> list | None:
        """Each image's ``(height, width)`` (``image_sizes``), which fixes its crops and unpadding."""
        sizes = arguments.get("image_sizes")
        if sizes is None:
            return None
        return [tuple(int(v) for v in s) for s in (sizes.tolist() if hasattr(sizes, "tolist") else sizes)]

    def views(self, model: Any, roles: Any, row: int, positions: torch.Tensor, encoded: Encoded, index: int,
              signal: Signal) -> list[View]:
        """Per image the base view then the high-resolution view; signals indexed by crop (``(crops, P)``)."""
        config = model.config
        side = self.crop_side(config)
        patches = side * side
        newline = ~roles.visual[row, positions]
        attention, features = signal("attention"), signal("features")
        sizes = encoded.layout
        source = None
        if sizes is not None and index < len(sizes):
            first_crop = sum(crop_sources(config, size)[1] for size in sizes[:index])
            source, _ = crop_sources(config, sizes[index])
            if source.numel() != positions.numel() or not torch.equal((source < 0).to(newline.device), newline):
                raise StageCannotRun(f"the LLaVA-NeXT layout of a {sizes[index]} image does not match its {positions.numel()} placeholders")
            source = source.to(positions.device) + first_crop * patches
        elif attention is not None or features is not None:
            raise StageCannotRun("no image_sizes reached get_image_features; LLaVA-NeXT crops cannot be mapped to tokens")
        clssim = None
        if features is not None:  # each crop's patches against that crop's own CLS
            clssim = torch.stack([prellm.cls_similarity(f[1:], f[0]) for f in features]).flatten()
        attention = attention.float().flatten() if attention is not None else None
        prunable = torch.nonzero(~newline).flatten()
        base, rest = prunable[:patches], prunable[patches:]
        parts = [(base, (side, side))]
        if rest.numel():
            after = newline.clone()
            after[: int(base[-1]) + 1 if base.numel() else 0] = False
            lines = int(after.sum())
            parts.append((rest, (lines, rest.numel() // lines) if lines and rest.numel() % lines == 0 else None))
        out = []
        for part, grid in parts:
            view = View(row, positions[part], grid)
            if source is not None:
                src = source[part].cpu()
                view.attention = attention[src] if attention is not None else None
                view.clssim = clssim[src] if clssim is not None else None
            out.append(view)
        return out

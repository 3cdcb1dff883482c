"""Pictures for ``recipe-eval --show IMAGE --layers … --out DIR`` (matplotlib, an optional extra).

* :func:`plot_schedules`: visual tokens alive entering each layer, several recipes overlaid
  (800×450 px).
* :func:`plot_kept_tokens`: for one image, the visual tokens dropped by each chosen layer darkened
  (black at alpha :data:`DROPPED_ALPHA`); kept tokens show the image unchanged. One panel
  (300×340 px) per layer and *view*; the family says where its tokens sit
  (``recipe_compiler.families``: ``CompilerFamily.picture_views``), e.g.:

  - LLaVA-1.5: one view, the model's input image (the processor's square crop) under its
    ``side × side`` grid;
  - LLaVA-NeXT: two views, each drawn over the original image: the base view (the whole image
    squashed to one crop, ``side × side`` tokens) and the high-resolution view (the anyres grid
    *after* ``unpad_image``, ``rows × cols`` tokens spread evenly over the original image; the
    row-end newline tokens are never pruned and not drawn);
  - Qwen2-VL / Qwen2.5-VL: one view, the processor-resized image (``grid_w·patch × grid_h·patch``
    px, what the vision encoder saw) under its ``grid_h/merge × grid_w/merge`` grid of merged tokens.

  Pictures larger than :data:`MAX_DRAWN_PX` on their longer side are shrunk for drawing; the
  token rectangles scale with them.

Both write PNGs of a fixed pixel size (no tight bounding box), so they can be checked by tests.
The token → rectangle arithmetic (:func:`grid_rectangles`, :func:`darken`) is pure;
:func:`kept_tokens` runs the model.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .errors import CompileError

SCHEDULE_SIZE_PX = (800, 450)
PANEL_PX = (300, 340)
_DPI = 100
DROPPED_ALPHA = 0.75  # darkening of a dropped token's patch
MAX_DRAWN_PX = 1024  # longer side of a picture as drawn; a panel is 300 px wide, more is wasted
_TITLE_PX, _BOTTOM_PX = 54, 7  # per panel row: room for the title above, margin below


def require_matplotlib():
    """Import matplotlib with the non-interactive Agg backend, or fail with one line."""
    try:
        import matplotlib
    except ImportError:
        raise CompileError("pictures need matplotlib: pip install 'recipe-compiler[plots]'") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_schedules(recipes: dict, path: str | Path) -> Path:
    """Draw the keep schedule (visual tokens alive entering each layer) of every recipe, overlaid."""
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(SCHEDULE_SIZE_PX[0] / _DPI, SCHEDULE_SIZE_PX[1] / _DPI), dpi=_DPI)
    for name, recipe in recipes.items():
        counts = recipe.keep_count
        ax.step(np.arange(len(counts)), counts, where="post", label=f"{name} (mean {counts.mean():.0f})", linewidth=1.8)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("visual tokens alive entering layer")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title("pruning schedules")
    fig.subplots_adjust(left=0.09, right=0.98, top=0.92, bottom=0.12)
    path = Path(path)
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------- token → rectangle (pure)
def grid_rectangles(rows: int, cols: int, height: int, width: int) -> np.ndarray:
    """The pixel rectangle of every token of a ``rows × cols`` grid spread evenly over a picture.

    Args:
        rows, cols: the token grid (row-major, as the tokens sit in the prompt).
        height, width: the picture as drawn, in pixels.

    Returns:
        float64 ``[rows, cols, 4]``: ``(x0, y0, x1, y1)`` per token, ``x`` to the right and ``y``
        down from the top-left corner; the rectangles tile the picture exactly.

    Example:
        >>> grid_rectangles(2, 4, 10, 40)[1, 3].tolist()
        [30.0, 5.0, 40.0, 10.0]
    """
    if min(rows, cols, height, width) < 1:
        raise ValueError(f"a token grid needs positive sizes, got {rows}x{cols} tokens over {height}x{width} px")
    ys = np.linspace(0.0, height, rows + 1)
    xs = np.linspace(0.0, width, cols + 1)
    rects = np.empty((rows, cols, 4))
    rects[..., 0], rects[..., 2] = xs[None, :-1], xs[None, 1:]
    rects[..., 1], rects[..., 3] = ys[:-1, None], ys[1:, None]
    return rects


def token_of_pixels(rows: int, cols: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """For each pixel row and column of a picture, the token row / column whose rectangle holds its centre.

    Args:
        rows, cols: the token grid.
        height, width: the picture as drawn, in pixels.

    Returns:
        ``(row_of_y int [height], col_of_x int [width])`` from :func:`grid_rectangles`.

    Example:
        >>> [a.tolist() for a in token_of_pixels(2, 3, 4, 6)]
        [[0, 0, 1, 1], [0, 0, 1, 1, 2, 2]]
    """
    rects = grid_rectangles(rows, cols, height, width)
    row_of_y = np.searchsorted(rects[1:, 0, 1], np.arange(height) + 0.5, side="right")
    col_of_x = np.searchsorted(rects[0, 1:, 0], np.arange(width) + 0.5, side="right")
    return row_of_y, col_of_x


def darken(rgb: np.ndarray, kept: np.ndarray, alpha: float = DROPPED_ALPHA) -> np.ndarray:
    """The picture with every dropped token's rectangle blended with black at ``alpha``.

    Args:
        rgb: float ``[H, W, 3]`` in [0, 1], the picture the token grid covers.
        kept: bool ``[rows, cols]``, True where the token is kept.
        alpha: opacity of the black over dropped tokens.

    Returns:
        float32 ``[H, W, 3]``; kept tokens' pixels are ``rgb`` exactly.

    Example:
        >>> darken(np.ones((2, 2, 3)), np.array([[True, False]]))[:, :, 0].tolist()
        [[1.0, 0.25], [1.0, 0.25]]
    """
    height, width = rgb.shape[:2]
    row_of_y, col_of_x = token_of_pixels(kept.shape[0], kept.shape[1], height, width)
    dropped = ~kept[row_of_y[:, None], col_of_x[None, :]]
    return (rgb * (1.0 - alpha * dropped)[..., None]).astype(np.float32)


# ----------------------------------------------------------------------------------- one prefill
@dataclass(frozen=True)
class TokenView:
    """One grid of visual tokens over one picture, as :func:`plot_kept_tokens` draws it.

    Attributes:
        name: "" for single-view families; "base view" / "high-res view" for LLaVA-NeXT.
        image: float ``[H, W, 3]`` in [0, 1]: the picture the grid is spread evenly over.
        positions: int64 ``[rows, cols]``: the prompt position of each token.
        kept: layer -> bool ``[rows, cols]``, True where the token enters that layer.
    """

    name: str
    image: np.ndarray
    positions: np.ndarray
    kept: dict

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.positions.shape[0]), int(self.positions.shape[1])


def _fit(picture: Any, size: tuple[int, int] | None = None) -> np.ndarray:
    """``picture`` (PIL) resized to ``size`` (width, height) if given, then shrunk to :data:`MAX_DRAWN_PX`."""
    from PIL import Image

    width, height = size or picture.size
    scale = min(1.0, MAX_DRAWN_PX / max(width, height))
    drawn = (max(1, round(width * scale)), max(1, round(height * scale)))
    if drawn != picture.size:
        picture = picture.resize(drawn, Image.BICUBIC)
    return np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0


def _input_image(inputs: dict, processor: Any) -> np.ndarray:
    pixels = inputs["pixel_values"][0].float().cpu()
    ip = processor.image_processor
    mean = torch.tensor(ip.image_mean).view(3, 1, 1)
    std = torch.tensor(ip.image_std).view(3, 1, 1)
    return (pixels * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def token_views(model: Any, processor: Any, inputs: dict, picture: Any) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Where each prunable visual token of a one-image prompt sits on the picture.

    Args:
        model: the VLM (its family says which placeholders are prunable and how they lie).
        processor: its processor (image mean / std for an input-crop picture).
        inputs: the processor's output for ``[picture]`` and one prompt.
        picture: the original PIL image.

    Returns:
        Per view ``(name, image, positions)``: see :class:`TokenView`.

    Raises:
        CompileError: an unsupported family, or placeholders that do not form the family's grid.

    Example:
        >>> inputs = loaded.processor(images=[pic], text=[loaded.format_prompt("Hi")], return_tensors="pt")  # doctest: +SKIP
        >>> [(name, positions.shape) for name, _, positions in token_views(loaded.model, loaded.processor, inputs, pic)]  # doctest: +SKIP
        [('base view', (8, 8)), ('high-res view', (8, 18))]
    """
    from runtime.families import family_for

    from .families import FAMILIES

    family = FAMILIES.get(getattr(model.config, "model_type", None))
    if family is None:
        raise CompileError(f"the kept-token picture supports {', '.join(FAMILIES)} models, not {getattr(model.config, 'model_type', None)!r}; "
                           "leave out --show")
    ids = inputs["input_ids"][:1]
    base_kwargs = {"image_sizes": inputs.get("image_sizes")}
    prunable = family_for(model).prunable_visual_tokens(model, ids, base_kwargs)[0]
    positions = prunable.nonzero().flatten().cpu().numpy().astype(np.int64)
    out = []
    for view in family.picture_views(model, inputs, positions):
        if view.canvas == "input":
            image = _input_image(inputs, processor)
        elif view.canvas == "original":
            image = _fit(picture)
        else:
            image = _fit(picture, tuple(view.canvas))
        out.append((view.name, image, view.positions))
    return out


def kept_tokens(loaded: Any, recipe: Any, image: Any, layers: Sequence[int], prompt: str = "Describe the image.",
                replay: dict | None = None) -> dict:
    """Run one prefill of ``image`` with ``recipe`` and return what :func:`plot_kept_tokens` draws.

    Args:
        loaded: a :class:`~recipe_compiler.models.LoadedModel` of a registered family.
        recipe: the recipe to apply.
        image: a path or a PIL image.
        layers: decoder layers to report.
        prompt: the question asked with the image.
        replay: optional forced keep sets, ``{pruning layer: [prompt positions]}`` as
            ``handle.last_request.selection`` gives them (see ``PruningHandle.replay``).

    Returns:
        ``{"views": [TokenView, ...], "image", "grid", "kept"}``; the last three are the first
        view's (the only one except for LLaVA-NeXT), ``grid`` as ``(rows, cols)``.

    Example:
        >>> data = kept_tokens(loaded, recipe, "cat.png", [2, 8])   # doctest: +SKIP
        >>> data["views"][0].kept[8].mean()                          # doctest: +SKIP
    """
    from PIL import Image

    for layer in layers:
        if layer >= recipe.num_layers:
            raise CompileError(f"layer {layer} does not exist: the model has {recipe.num_layers} layers (0..{recipe.num_layers - 1})")
    model, processor = loaded.model, loaded.processor
    picture = image.convert("RGB") if isinstance(image, Image.Image) else Image.open(image).convert("RGB")
    inputs = processor(images=[picture], text=[loaded.format_prompt(prompt)], return_tensors="pt")
    views = token_views(model, processor, inputs, picture)
    device = next(model.parameters()).device
    inputs = {k: v.to(device) if hasattr(v, "to") else v for k, v in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(next(model.parameters()).dtype)
    with torch.no_grad(), recipe.apply(model) as handle:
        with handle.replay(replay) if replay is not None else contextlib.nullcontext():
            model(**inputs, use_cache=False, logits_to_keep=1)
        request = handle.last_request
    selection = request.selection if request is not None else {}
    out = []
    for name, picture_rgb, positions in views:
        kept = {}
        for layer in layers:
            earlier = [p for p in selection if p <= layer]
            if earlier:
                kept[layer] = np.isin(positions, selection[max(earlier)][0].numpy())
            else:
                kept[layer] = np.ones(positions.shape, dtype=bool)
        out.append(TokenView(name, picture_rgb, positions, kept))
    return {"views": out, "image": out[0].image, "grid": out[0].grid, "kept": out[0].kept}


# --------------------------------------------------------------------------------------- drawing
def render_kept_tokens(views: Sequence[TokenView], layers: Sequence[int], path: str | Path, title: str = "") -> Path:
    """Draw ``views`` (from :func:`kept_tokens`): one row of panels per view, one column per layer.

    Args:
        views: :class:`TokenView` s whose ``kept`` holds every entry of ``layers``.
        layers: the layers to draw, left to right.
        path: the PNG to write.
        title: drawn above the panels.

    Returns:
        ``path``; the PNG is ``PANEL_PX[0] · len(layers)`` wide and ``PANEL_PX[1] · len(views)`` high.

    Example:
        >>> render_kept_tokens(kept_tokens(loaded, recipe, "cat.png", [2])["views"], [2], "t.png")  # doctest: +SKIP
    """
    plt = require_matplotlib()
    nrows, ncols = len(views), len(layers)
    fig_h = PANEL_PX[1] * nrows
    fig, axes = plt.subplots(nrows, ncols, figsize=(PANEL_PX[0] * ncols / _DPI, fig_h / _DPI), dpi=_DPI, squeeze=False)
    for row_axes, view in zip(axes, views):
        height, width = view.image.shape[:2]
        # nearest when enlarging keeps token edges sharp; antialiasing when shrinking avoids moiré
        interpolation = "nearest" if max(height, width) <= PANEL_PX[0] else "antialiased"
        for ax, layer in zip(row_axes, layers):
            mask = view.kept[layer]
            ax.imshow(darken(view.image, mask), extent=(0, width, height, 0), interpolation=interpolation)
            label = f"layer {layer}" + (f", {view.name}" if view.name else "")
            ax.set_title(f"{label}: {int(mask.sum())}/{mask.size} kept", fontsize=9)
            ax.set_xticks([]); ax.set_yticks([])  # noqa: E702
    if title:
        fig.suptitle(title, fontsize=10)
    axes_h = (fig_h - nrows * (_TITLE_PX + _BOTTOM_PX)) / nrows
    fig.subplots_adjust(left=0.02, right=0.98, top=1 - _TITLE_PX / fig_h, bottom=_BOTTOM_PX / fig_h, wspace=0.05,
                        hspace=(_TITLE_PX + _BOTTOM_PX) / axes_h)
    path = Path(path)
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    return path


def plot_kept_tokens(loaded: Any, recipe: Any, image: Any, layers: Sequence[int], path: str | Path, title: str = "",
                     replay: dict | None = None) -> Path:
    """Draw, for ``image``, which visual tokens enter each of ``layers`` under ``recipe``.

    One panel per layer and view (see the module docstring): the picture, with every dropped
    token's rectangle darkened (black at alpha 0.75) and kept ones untouched.

    Args:
        loaded, recipe, image, layers, replay: as for :func:`kept_tokens`.
        path: the PNG to write.
        title: drawn above the panels.

    Returns:
        ``path``.

    Example:
        >>> plot_kept_tokens(loaded, recipe, "cat.png", [2, 8, 16], "tokens.png")   # doctest: +SKIP
    """
    data = kept_tokens(loaded, recipe, image, layers, replay=replay)
    return render_kept_tokens(data["views"], layers, path, title=title)

"""Pictures for ``recipe-eval --show IMAGE --layers … --out DIR`` (matplotlib, an optional extra).

* :func:`plot_schedules`: visual tokens alive entering each layer, several recipes overlaid
  (800×450 px).
* :func:`plot_kept_tokens`: for one image, the model's actual input image with the visual tokens
  dropped by each chosen layer darkened; kept tokens show the image unchanged (300 px per layer
  wide, 340 px high).

Both write PNGs of a fixed pixel size (no tight bounding box), so they can be checked by tests.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .errors import CompileError

SCHEDULE_SIZE_PX = (800, 450)
PANEL_PX = (300, 340)
_DPI = 100
DROPPED_ALPHA = 0.75  # darkening of a dropped token's patch


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


def kept_tokens(loaded: Any, recipe: Any, image: Any, layers: Sequence[int], prompt: str = "Describe the image.") -> dict:
    """Run one prefill of ``image`` with ``recipe`` and return what :func:`plot_kept_tokens` draws.

    Returns:
        ``{"image": float [H, W, 3] in [0, 1] (the model's input image), "grid": side,
        "kept": {layer: bool [side, side]}}``.
    """
    from PIL import Image

    model, processor = loaded.model, loaded.processor
    picture = image if isinstance(image, Image.Image) else Image.open(image).convert("RGB")
    inputs = processor(images=[picture], text=[loaded.format_prompt(prompt)], return_tensors="pt")
    device = next(model.parameters()).device
    inputs = {k: v.to(device) if hasattr(v, "to") else v for k, v in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(next(model.parameters()).dtype)
    with torch.no_grad(), recipe.apply(model) as handle:
        model(**inputs, use_cache=False, logits_to_keep=1)
        request = handle.last_request
        image_token = handle.image_token_id
    visual = (inputs["input_ids"][0] == image_token).nonzero().flatten().cpu()
    n = int(visual.numel())
    side = math.isqrt(n)
    if side * side != n:
        raise CompileError(f"the kept-token picture needs a square grid of visual tokens (LLaVA-1.5); this image has {n}")
    selection = request.selection if request is not None else {}
    kept = {}
    for layer in layers:
        if layer >= recipe.num_layers:
            raise CompileError(f"layer {layer} does not exist: the model has {recipe.num_layers} layers (0..{recipe.num_layers - 1})")
        earlier = [p for p in selection if p <= layer]
        mask = np.ones(n, dtype=bool)
        if earlier:
            positions = selection[max(earlier)][0]
            mask = torch.isin(visual, positions).numpy()
        kept[layer] = mask.reshape(side, side)
    pixels = inputs["pixel_values"][0].float().cpu()
    ip = processor.image_processor
    mean = torch.tensor(ip.image_mean).view(3, 1, 1)
    std = torch.tensor(ip.image_std).view(3, 1, 1)
    rgb = (pixels * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
    return {"image": rgb, "grid": side, "kept": kept}


def plot_kept_tokens(loaded: Any, recipe: Any, image: Any, layers: Sequence[int], path: str | Path, title: str = "") -> Path:
    """Draw, for ``image``, which visual tokens enter each of ``layers`` under ``recipe``.

    One panel per layer: the model's input image, with every dropped token's patch darkened
    (black at alpha 0.75) and kept patches untouched.
    """
    plt = require_matplotlib()
    data = kept_tokens(loaded, recipe, image, layers)
    rgb, side = data["image"], data["grid"]
    height, width = rgb.shape[:2]
    fig, axes = plt.subplots(1, len(layers), figsize=(PANEL_PX[0] * len(layers) / _DPI, PANEL_PX[1] / _DPI), dpi=_DPI, squeeze=False)
    for ax, layer in zip(axes[0], layers):
        mask = data["kept"][layer]
        overlay = np.zeros((side, side, 4), dtype=np.float32)
        overlay[..., 3] = np.where(mask, 0.0, DROPPED_ALPHA)
        ax.imshow(rgb, extent=(0, width, height, 0), interpolation="nearest")
        ax.imshow(overlay, extent=(0, width, height, 0), interpolation="nearest")
        ax.set_title(f"layer {layer}: {int(mask.sum())}/{mask.size} kept", fontsize=9)
        ax.set_xticks([]); ax.set_yticks([])  # noqa: E702
    if title:
        fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.02, right=0.98, top=0.84, bottom=0.02, wspace=0.05)
    path = Path(path)
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    return path

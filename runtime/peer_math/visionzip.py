"""VisionZip (dvlab-research/VisionZip, PyPI ``visionzip`` 0.1.3): dominant + contextual tokens.

Reference (docs/methods.md, VisionZip; ``visionzip/clip_encoder.py`` l.42–85, ``utils.py``
l.10–135): at the vision layer used as the LLaVA feature layer (``hidden_states[-2]``,
``attentions[-2]``, CLS included):

* **dominant**: the CLS row of that layer's attention summed over heads; the top
  ``dominant − 1`` patches plus CLS itself, gathered in position order (CLS first);
* **contextual**: the remaining tokens, compared by the layer's keys averaged over heads
  (L2-normalised); ``contextual`` targets at a uniform stride ``max(1, M // contextual)`` over
  the remaining ``M`` (the first ``contextual`` of ``0, step, 2·step, …``); every other remaining
  token goes to its most similar target (first maximum on ties); a target's new feature is its
  own hidden state **plus the mean** of the tokens assigned to it (itself unchanged if none).

The output is ``[dominant (position order), contextual (target order)]``, ``dominant +
contextual`` features per image, before the projector. We emit the same order and the same
features; deviations: ties in the dominant top-k go to the earlier position; ``contextual = 0``
is allowed (the reference divides by it); ``contextual > M`` is refused (the reference's shapes
break). LLaVA-NeXT runs it on every crop (:func:`anyres_order` gives the reference's layout).

Example:
    >>> import torch
    >>> torch.manual_seed(0) and None
    >>> h, k = torch.randn(2, 17, 8), torch.randn(2, 17, 4)
    >>> a = torch.softmax(torch.randn(2, 3, 17), -1)
    >>> out = visionzip(h, a, k, dominant=5, contextual=3)
    >>> tuple(out.features.shape), out.dominant_index[:, 0].tolist()
    ((2, 8, 8), [0, 0])
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._common import as_batch, check_count, order_best_first, work_dtype

__all__ = ["SETTINGS", "SETTINGS_PER_CROP", "VisionZipResult", "visionzip", "anyres_order"]

SETTINGS = {64: (54, 10), 128: (108, 20), 192: (162, 30)}
"""LLaVA-1.5 totals → (dominant incl. CLS, contextual), the paper's and README's settings."""
SETTINGS_PER_CROP = {128: (108, 20), 64: (54, 10), 32: (27, 5)}
"""LLaVA-NeXT, per crop (base image and each high-res crop): 640 / 320 / 160 tokens for 5 crops."""


@dataclass(frozen=True)
class VisionZipResult:
    """What :func:`visionzip` returns (B = images).

    Attributes:
        dominant_index: (B, dominant) positions in the encoder sequence (0 = CLS), ascending.
        contextual_index: (B, contextual) positions of the contextual targets, in output order.
        assignment: (B, M − contextual) the target slot (0…contextual−1) each merged token went to,
            the merged tokens in position order.
        merged_index: (B, M − contextual) positions of those merged tokens.
        features: (B, dominant + contextual, C) the new image features, in the reference's order.
    """

    dominant_index: torch.Tensor
    contextual_index: torch.Tensor
    assignment: torch.Tensor
    merged_index: torch.Tensor
    features: torch.Tensor


def visionzip(
    hidden: torch.Tensor, cls_attention: torch.Tensor, keys: torch.Tensor, dominant: int = 54, contextual: int = 10
) -> VisionZipResult:
    """VisionZip's dominant selection and contextual merge for a batch of images.

    Args:
        hidden: (B, N + 1, C) the feature layer's output, CLS at position 0.
        cls_attention: (B, H, N + 1) that layer's post-softmax attention row of the CLS query.
        keys: (B, N + 1, D) that layer's keys averaged over heads (VisionZip's ``metric``).
        dominant: tokens kept by attention, CLS included (the API's ``dominant``; 54 → 53 patches).
        contextual: merged tokens.

    Returns:
        :class:`VisionZipResult`.
    """
    h, _ = as_batch(hidden, "hidden", 3)
    a, _ = as_batch(cls_attention, "cls_attention", 3)
    k, _ = as_batch(keys, "keys", 3)
    B, T, C = h.shape
    if a.shape[0] != B or a.shape[2] != T or k.shape[:2] != (B, T):
        raise ValueError(f"cls_attention {tuple(a.shape)} and keys {tuple(k.shape)} must match hidden {tuple(h.shape)} "
                         "as (B, H, N+1) and (B, N+1, D)")
    check_count(dominant, T, "dominant")
    if dominant < 1:
        raise ValueError("dominant=0 is out of range; it counts the CLS token, so it must be at least 1")
    rest = T - dominant
    check_count(contextual, rest, "contextual")

    patch_scores = a.to(work_dtype(a)).sum(dim=1)[:, 1:]  # (B, N): CLS → patch, summed over heads
    top = order_best_first(patch_scores)[:, : dominant - 1] + 1
    is_dominant = torch.zeros(B, T, dtype=torch.bool, device=h.device)
    is_dominant[:, 0] = True
    is_dominant.scatter_(1, top, True)
    positions = torch.arange(T, device=h.device).expand(B, T)
    dominant_index = positions[is_dominant].view(B, dominant)
    remaining = positions[~is_dominant].view(B, rest)

    if contextual == 0:
        empty = torch.empty(B, 0, dtype=torch.long, device=h.device)
        merged = remaining
        return VisionZipResult(dominant_index, empty, torch.empty_like(merged), merged,
                               h.gather(1, dominant_index[..., None].expand(-1, -1, C)))
    step = max(1, rest // contextual)
    slots = torch.arange(0, rest, step, device=h.device)[:contextual]  # slots within the remaining tokens
    is_target = torch.zeros(rest, dtype=torch.bool, device=h.device)
    is_target[slots] = True
    contextual_index = remaining[:, slots]
    merged_index = remaining[:, ~is_target]

    def take(x, index):
        return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))

    metric = k.to(work_dtype(k)) / k.to(work_dtype(k)).norm(dim=-1, keepdim=True)
    similarity = torch.bmm(take(metric, merged_index), take(metric, contextual_index).transpose(1, 2))  # (B, m, c)
    assignment = similarity.argmax(dim=2)  # first maximum on ties
    one_hot = torch.nn.functional.one_hot(assignment, contextual).to(h.dtype)  # (B, m, c)
    counts = one_hot.sum(dim=1).clamp(min=1)[..., None]
    mean_assigned = torch.bmm(one_hot.transpose(1, 2), take(h, merged_index)) / counts
    features = torch.cat([take(h, dominant_index), take(h, contextual_index) + mean_assigned], dim=1)
    return VisionZipResult(dominant_index, contextual_index, assignment, merged_index, features)


def anyres_order(dominant_index: torch.Tensor, contextual: int, grid_rows: int, grid_cols: int, side: int) -> torch.Tensor:
    """The reference's LLaVA-NeXT layout of per-crop VisionZip outputs.

    VisionZip's ``restore_image_features_sorted`` (``llava_arch.py`` l.42–80) emits, for one
    image of ``1 + grid_rows·grid_cols`` crops (base first): the base crop's output as is; the
    high-res crops' dominant **patches** in raster order over the whole high-res grid (rows across
    crops; no unpadding, no row-end newlines); the high-res crops' CLS tokens; their contextual
    tokens, crop by crop.

    Args:
        dominant_index: (1 + grid_rows·grid_cols, dominant) each crop's
            :attr:`VisionZipResult.dominant_index` (CLS = 0, patches ``1…side²``).
        contextual: contextual tokens per crop.
        grid_rows, grid_cols: high-res crops per column and per row.
        side: patches per crop side (24 for CLIP-L/336).

    Returns:
        (n_out,) int64: indices into the crop-major concatenation of the per-crop outputs
        (``dominant + contextual`` each), in the order the reference feeds the language model.
    """
    d_idx, _ = as_batch(dominant_index, "dominant_index", 2)
    crops, d = d_idx.shape
    if crops != 1 + grid_rows * grid_cols:
        raise ValueError(f"dominant_index has {crops} crops; a {grid_rows}×{grid_cols} grid needs {1 + grid_rows * grid_cols}")
    per = d + contextual
    base = torch.arange(per)
    patch_slots, keys = [], []
    for crop in range(1, crops):
        r, c = divmod(crop - 1, grid_cols)
        p = d_idx[crop, 1:].cpu() - 1  # patch index within the crop, ascending
        row, col = r * side + p // side, c * side + p % side
        keys.append(row * (grid_cols * side) + col)
        patch_slots.append(crop * per + torch.arange(1, d))
    keys = torch.cat(keys) if keys else torch.empty(0, dtype=torch.long)
    patch_slots = torch.cat(patch_slots) if patch_slots else torch.empty(0, dtype=torch.long)
    raster = patch_slots[torch.argsort(keys, stable=True)]
    cls = torch.arange(1, crops) * per
    ctx = (torch.arange(1, crops)[:, None] * per + d + torch.arange(contextual)[None, :]).flatten()
    return torch.cat([base, raster, cls, ctx])

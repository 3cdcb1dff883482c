"""VTC-CLS (THU-MIG/VTC-CLS): keep the patches with the most CLS attention over encoder layers.

Reference (docs/methods.md, VTC-CLS; ``llava/model/multimodal_encoder/clip_encoder.py``
``cls_token_only``, ``llava/model/llava_arch.py`` ``encode_images``): with
``output_attentions=True``, for every encoder layer in ``attentions[start_layer:-1]`` (default
``--layer 16``: layers 16…22 of CLIP-L's 24) take the CLS row, mean over heads, patches only, and
**sum** over those layers; keep the ``token_num`` (default 36) best patches of the feature layer
(``hidden_states[-2]``), restored to spatial order.

Deviations: ties go to the earlier position; any batch size (the reference squeezes row 0).

Example:
    >>> import torch
    >>> rows = torch.softmax(torch.randn(7, 2, 3, 17), -1)   # (layers, B, heads, 1 + 16 patches)
    >>> select(scores(rows), 4).sum(dim=1).tolist()
    [4, 4]
"""
from __future__ import annotations

import torch

from ._common import as_batch, check_count, top_k_mask, work_dtype

__all__ = ["DEFAULT_START_LAYER", "DEFAULT_TOKEN_NUM", "layer_range", "scores", "select"]

DEFAULT_START_LAYER = 16
DEFAULT_TOKEN_NUM = 36


def layer_range(num_layers: int, start_layer: int = DEFAULT_START_LAYER) -> range:
    """Encoder layers summed: ``attentions[start_layer:-1]``, i.e. ``start … num_layers − 2``.

    Example:
        >>> list(layer_range(24))
        [16, 17, 18, 19, 20, 21, 22]
    """
    check_count(num_layers, 1 << 20, "num_layers")
    if not isinstance(start_layer, int) or isinstance(start_layer, bool):
        raise ValueError(f"start_layer={start_layer!r} must be an integer")
    layers = range(num_layers)[start_layer:-1]
    if len(layers) == 0:
        raise ValueError(f"start_layer={start_layer} leaves no layer before the last of {num_layers}; use one in [0, {num_layers - 2}]")
    return layers


def scores(cls_rows: torch.Tensor) -> torch.Tensor:
    """(B, N): Σ over layers of the head-mean CLS→patch attention.

    Args:
        cls_rows: (n_layers, B, H, 1 + N) the CLS query's post-softmax attention row of each layer
            in :func:`layer_range` (key 0 is CLS itself).
    """
    x, single = as_batch(cls_rows, "cls_rows", 4)
    if single:  # (n_layers, H, 1 + N): one image
        x = x.squeeze(0).unsqueeze(1)
    out = x.to(work_dtype(x)).mean(dim=2)[..., 1:].sum(dim=0)
    return out[0] if single else out


def select(scores: torch.Tensor, token_num: int = DEFAULT_TOKEN_NUM) -> torch.Tensor:
    """(B, N) bool: the ``token_num`` best patches (ties: the earlier position), in spatial order."""
    s, single = as_batch(scores, "scores", 2)
    check_count(token_num, s.shape[1], "token_num")
    out = top_k_mask(s, token_num)
    return out[0] if single else out

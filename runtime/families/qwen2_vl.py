"""Qwen2-VL (``Qwen2VLForConditionalGeneration``, ``model_type == "qwen2_vl"``).

Layout in transformers 5.x: ``model.model`` (``Qwen2VLModel``) holds ``.visual`` and
``.language_model`` (``Qwen2VLTextModel`` with ``.layers``). Each image becomes one contiguous run
of ``<|image_pad|>`` placeholders (``config.image_token_id``), (t·h·w)/spatial_merge_size² of them,
so the count depends on the image's size (dynamic resolution).

**Positions (M-RoPE).** ``Qwen2VLModel`` computes the (t, h, w) positions of the whole, unpruned
prompt with ``get_rope_index`` before the decoder layers (``generate`` does it in
``_prepare_position_ids_for_generation`` and keeps ``rope_deltas`` on ``model.model``); the rotary
module mixes the three rows by ``mrope_section`` and hands every decoder layer (cos, sin) of shape
(B, L, head_dim) plus the text-position row as ``position_ids``, exactly like Llama. The pruner
gathers the kept rows of both at the pruning layer, so a kept visual token keeps its (t, h, w)
position, and ``get_rope_index`` never sees a pruned prompt. Decode steps get their positions from
``generate``'s own bookkeeping over the unpruned prompt (text position + ``rope_deltas``), which is
what the unpruned model would use.

**Reference image.** Dynamic resolution has no native image size, so a recipe's unit is a
reference image of 32 × 32 vision patches: 448 × 448 px for every released Qwen2-VL / Qwen2.5-VL
checkpoint (patch 14), ``(32 / spatial_merge_size)² = 256`` visual tokens. Other images scale the
recipe's ratios (``Recipe.keep_counts_for``).

**What may be pruned.** Image placeholders only. Video placeholders (``video_token_id``) are kept:
recipes are calibrated on images, and a keep ratio measured on still images says nothing about
video frames, whose tokens are redundant in time in a way images are not. They run unpruned and are
counted as non-visual tokens.

**Pre-LLM stages.** One view per image, the merged ``(t·h/merge) × (w/merge)`` grid. The encoder
has no CLS token, so ``"features"`` (CLS similarity) is not provided; ``"attention"`` is the mean
over heads and query rows of the attention each patch receives at the feature layer (recomputed
from that block's ``qkv`` with the vision rotary embedding, per image as ``cu_seqlens`` bounds it),
averaged over each ``merge × merge`` group.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Callable

import torch

from ..errors import StageCannotRun
from .base import Encoded, Family, Signal, View, jsonable, register_family

REFERENCE_GRID_PATCHES = 32
"""Side of the reference image in vision patches (448 px at Qwen's 14-px patches)."""


@register_family("qwen2_vl")
class Qwen2VLFamily(Family):
    """Qwen2-VL: image placeholders anywhere in the prompt, M-RoPE positions kept."""

    text_fields = Family.text_fields + ("layer_types",)
    vision_fields = (
        "depth", "embed_dim", "hidden_size", "intermediate_size", "mlp_ratio", "num_heads", "out_hidden_size",
        "in_channels", "patch_size", "spatial_merge_size", "temporal_patch_size", "hidden_act", "window_size",
        "fullatt_block_indexes", "tokens_per_second",
    )
    top_fields = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    layer_kinds_hint = "use_sliding_window=True; released Qwen2-VL / Qwen2.5-VL checkpoints have none"

    pre_llm = True
    signals = {
        "attention": None,
        "features": "its vision encoder has no CLS token",
        "encoder_patches": "its patch merger folds 2×2 encoder patches into one token",
    }
    vllm_refusal = (
        "Qwen2-VL is not served by the vLLM plugin yet: its kept tokens need their original M-RoPE (t, h, w) positions, "
        "and vLLM 0.32's in-tree hook for pruned positions (SupportsMultiModalPruning.recompute_mrope_positions) is never "
        "called by its CPU model runner, and on GPU only with video_pruning_rate > 0, so the plugin would have to set them "
        "itself (as it does for LLaVA), which it does not do for Qwen yet; serve it with the HF runtime "
        "(runtime.load(recipe).apply(model))"
    )

    def reference_visual_tokens(self, config: Any) -> int:
        """Visual tokens of a 32 × 32-patch image: (32 / spatial_merge_size)², 256 for released checkpoints."""
        merge = int(config.vision_config.spatial_merge_size)
        return (REFERENCE_GRID_PATCHES // merge) ** 2

    def prunable_visual_tokens(self, model: Any, input_ids: torch.Tensor, base_kwargs: dict) -> torch.Tensor:
        """Image placeholders; video placeholders are kept (see the module docstring)."""
        return input_ids == int(model.config.image_token_id)

    def fingerprint(self, model: Any) -> dict:
        """The base fingerprint, with M-RoPE's section split and theta folded into ``config_hash``.

        transformers 5.x normalises ``rope_scaling={"type": "mrope", ...}`` into ``rope_parameters``;
        only the numbers that change positions are hashed, so an old and a re-saved config agree.
        """
        found = super().fingerprint(model)
        rope = getattr(self.text_config(model), "rope_parameters", None) or {}
        mrope = {key: jsonable(rope.get(key)) for key in ("mrope_section", "rope_theta", "rope_type")}
        combined = json.dumps({"base": found["config_hash"], "mrope": mrope}, sort_keys=True)
        found["config_hash"] = hashlib.sha256(combined.encode()).hexdigest()[:16]
        return found

    # ------------------------------------------------------------------ pre-LLM stages
    def vision_layers(self, model: Any) -> torch.nn.ModuleList:
        """The vision transformer's ``visual.blocks``."""
        return self.base_model(model).visual.blocks

    def default_feature_layer(self, model: Any) -> int:
        return -1  # the merger reads the last block's output

    def signal_hooks(self, model: Any, capture: set, feature_layer: int | None, record: Callable[[str, torch.Tensor], None]) -> list:
        if "attention" not in capture:
            return []

        def on_attention_input(module: Any, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            cu = kwargs.get("cu_seqlens", args[1] if len(args) > 1 else None)
            record("attention", received_attention(module, x, cu, kwargs["position_embeddings"]))

        attn = self.vision_layers(model)[self.feature_encoder_layer(model, feature_layer)].attn
        return [attn.register_forward_pre_hook(on_attention_input, with_kwargs=True)]

    def image_layout(self, arguments: dict) -> list | None:
        """Each image's ``(t, h, w)`` in patches (``image_grid_thw``)."""
        grids = arguments.get("image_grid_thw")
        return None if grids is None else [tuple(int(v) for v in g) for g in grids.tolist()]

    def views(self, model: Any, roles: Any, row: int, positions: torch.Tensor, encoded: Encoded, index: int,
              signal: Signal) -> list[View]:
        """One view per image, the merged grid; the signal is per patch, in encoding order."""
        merge = int(model.config.vision_config.spatial_merge_size)
        attention = signal("attention")
        grids = encoded.layout
        if grids is None or index >= len(grids):
            if attention is not None:
                raise StageCannotRun("no image_grid_thw reached get_image_features; Qwen-VL patches cannot be mapped to tokens")
            return [View(row, positions, None)]
        t, h, w = grids[index]
        if t * h * w // merge**2 != positions.numel():
            raise StageCannotRun(f"a Qwen-VL image of grid {(t, h, w)} does not match its {positions.numel()} placeholders")
        view = View(row, positions, (t * h // merge, w // merge))
        if attention is not None:
            first = sum(a * b * c for a, b, c in grids[:index])
            patches = attention[first:first + t * h * w]
            view.attention = patches.view(-1, merge * merge).mean(dim=1)  # mean over each merge group
        return [view]


def received_attention(module: Any, x: torch.Tensor, cu_seqlens: torch.Tensor, position_embeddings: tuple) -> torch.Tensor:
    """(patches,): the mean over heads and query rows of the attention each patch receives in one
    Qwen-VL vision block, within each image (``cu_seqlens``), from the block's input ``x``."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

    cos, sin = position_embeddings
    with torch.no_grad():
        seq = x.shape[0]
        q, k, _ = module.qkv(x).reshape(seq, 3, module.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        q, k = q.float().transpose(0, 1), k.float().transpose(0, 1)  # (H, T, hd)
        received = torch.zeros(seq, dtype=torch.float32, device=x.device)
        bounds = cu_seqlens.tolist()
        for start, end in zip(bounds[:-1], bounds[1:]):
            keys = k[:, start:end]
            total = torch.zeros(end - start, dtype=torch.float32, device=x.device)
            for q0 in range(start, end, 1024):  # query blocks bound the memory to H·1024·T
                probs = torch.softmax((q[:, q0:min(q0 + 1024, end)] @ keys.transpose(-1, -2)) * module.scaling, dim=-1)
                total += probs.sum(dim=(0, 1))
            received[start:end] = total / (module.num_heads * (end - start))
    return received

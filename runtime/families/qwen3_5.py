"""Qwen3.5 (``Qwen3_5ForConditionalGeneration``, ``model_type == "qwen3_5"``): hybrid linear / full attention.

Layout and positions are Qwen3-VL's (:mod:`runtime.families.qwen3_vl`, :mod:`runtime.families.qwen2_vl`):
``model.model`` holds ``.visual`` (Qwen3-VL's ViT with learned position embeddings and one merger,
**no deepstack**) and ``.language_model`` (``Qwen3_5TextModel``); each image is one run of
``<|image_pad|>`` placeholders; interleaved M-RoPE (t, h, w) positions of the unpruned prompt
reach every decoder layer as (cos, sin) rows that the pruner gathers; video placeholders are kept;
the reference image is 32 × 32 vision patches (512 px at 16-px patches): 256 tokens. No CLS token.

**Layers of two kinds** (``text_config.layer_types``; 3 ``linear_attention`` then 1
``full_attention`` in every released checkpoint):

* ``full_attention``: gated softmax attention with a per-token KV cache (``DynamicLayer``). The
  pruner rebuilds its causal mask after a cut, sized from the first full-attention layer at or
  after the cut (a linear layer has no KV length to size it from), and the cache holds only the
  kept tokens.
* ``linear_attention``: a Gated DeltaNet, a short causal convolution and a recurrent state of
  ``d_k × d_v`` per head (``LinearAttentionLayer`` in the cache). It has **no per-token KV** to shrink,
  and no attention rows to rank tokens by: tokens pruned before it still save its compute, and its
  conv and recurrent states after prefill are those of the pruned sequence, exactly what the model
  computes on that sequence. Its "mask" is the 2D padding mask the layer multiplies its input by;
  after a cut it is the pruned sequence's (re-padding dummies zeroed, so they leave the state
  untouched, as left padding does).

**Probes only on attention layers.** A scoring cut on entry to layer ``l`` reads layer ``l − 1``'s
attention, so a recipe may prune on entry to layer ``l ≥ 1`` only where ``l − 1`` is a
full-attention layer (:meth:`Family.attention_layers`), and the pruner refuses any other recipe at
``apply()``; the compiler's searches are offered those layers only. A pre-LLM stage (layer 0)
needs no probe.
"""
from __future__ import annotations

from typing import Any, Callable

from .base import register_family
from .qwen3_vl import Qwen3VLFamily


@register_family("qwen3_5")
class Qwen3_5Family(Qwen3VLFamily):
    """Qwen3.5: Qwen3-VL's layout without deepstack; Gated-DeltaNet and full-attention layers."""

    text_fields = Qwen3VLFamily.text_fields + (
        "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
        "linear_conv_kernel_dim", "attn_output_gate",
    )
    vision_fields = tuple(f for f in Qwen3VLFamily.vision_fields if f != "deepstack_visual_indexes")
    layer_kinds = ("full_attention", "linear_attention")
    vllm_refusal = (
        "Qwen3.5 is not served by the vLLM plugin yet: as for Qwen2-VL its kept tokens need their original M-RoPE (t, h, w) "
        "positions, which vLLM 0.32 does not give pruned tokens, and its Gated-DeltaNet layers keep per-request recurrent "
        "state in vLLM's own mamba cache, which the plugin does not handle; serve it with the HF runtime "
        "(runtime.load(recipe).apply(model))"
    )

    def attention_layers(self, model: Any) -> tuple[int, ...]:
        """The full-attention layers (the only ones with attention rows to probe)."""
        kinds = self.layer_kinds_of(model)
        return tuple(i for i, kind in enumerate(kinds) if kind == "full_attention")

    def pruning_hooks(self, model: Any, pruned: Callable[[], Any]) -> list:
        """None: no deepstack, nothing outside the decoder layers indexes token positions."""
        return []

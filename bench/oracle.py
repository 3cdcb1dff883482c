"""The oracle prefill: the stock decoder layers run directly on exactly the kept tokens per layer.

Given a pruned prefill's keep sets, the oracle is the best any runtime could do on this hardware
with that schedule: no hooks, no probes, no top-k, no mask rebuilding. It replaces the language
model's ``forward`` (an instance attribute, only while timed) with a plain loop over the stock
decoder layers; at each pruning layer the hidden states are gathered once with an index computed
beforehand, and every layer gets the keyword arguments (attention mask, rotary tables, position
ids) that the pruned run handed it, precomputed. The vision encoder, the embedding merge, the
final norm and the LM head run as in a stock forward, so the oracle's wall time compares with a
full pruned or unpruned ``model(...)`` call.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from runtime.families import family_for


@dataclass
class OracleSchedule:
    """What the oracle replays: per layer, the kwargs it gets and (at pruning layers) the gather index."""

    layer_kwargs: list[dict]  # per decoder layer, the pruned run's kwargs minus the cache
    gathers: dict[int, torch.Tensor]  # layer -> (B, L', D)-expanded index into the previous sequence
    tokens_per_layer: list[int]  # sequence width entering each layer (for the report)


def _relative_index(previous_orig: torch.Tensor, previous_valid: torch.Tensor, orig: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Where each kept prompt position sits in the previous (left-padded) sequence; dummies read slot 0."""
    rows = []
    for row in range(orig.shape[0]):
        # Padding and re-padding dummies lead each row, so marking them -1 keeps the row sorted.
        keys = torch.where(previous_valid[row], previous_orig[row], torch.full_like(previous_orig[row], -1))
        found = torch.searchsorted(keys.contiguous(), orig[row].contiguous())
        rows.append(torch.where(valid[row], found, torch.zeros_like(found)))
    return torch.stack(rows)


def capture_schedule(model: torch.nn.Module, recipe: Any, inputs: dict, fuse_probe: bool = True) -> tuple[OracleSchedule, Any]:
    """Run one pruned prefill of ``inputs`` and record what the oracle needs; also return its output.

    ``fuse_probe=False`` runs the stock attention kernel at the probed layers (the runtime fuses
    the probe into it by default), so that the pruned output equals the oracle's bit for bit."""
    family = family_for(model)
    layers = family.layers(model)
    seen: list[dict] = [None] * len(layers)  # type: ignore[list-item]
    widths: list[int] = [0] * len(layers)

    def recorder(index: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            widths[index] = int(hidden.shape[1])
            seen[index] = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values", "cache", "use_cache")}
        return hook

    with recipe.apply(model) as handle:
        handle.policy.fuse_probe = fuse_probe
        # Registered after the runtime's own pre-hooks, so they see the kwargs those handed on.
        hooks = [layer.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, layer in enumerate(layers)]
        try:
            with torch.no_grad():
                output = model(**inputs, use_cache=True, logits_to_keep=1)
        finally:
            for hook in hooks:
                hook.remove()
        request = handle.last_request
    if request is None:
        raise RuntimeError("the pruned prefill did not prune (no image tokens, or the recipe keeps everything)")
    batch, length = request.roles.valid.shape[0], request.prompt_len
    mask = inputs.get("attention_mask")
    orig = torch.arange(length).expand(batch, -1)
    valid = mask.bool().cpu() if mask is not None else torch.ones(batch, length, dtype=torch.bool)
    gathers = {}
    hidden_size = family.text_config(model).hidden_size
    for layer in sorted(request.kept):
        kept_orig, kept_valid = (t.cpu() for t in request.kept[layer])
        index = _relative_index(orig, valid, kept_orig, kept_valid)
        device = model.get_input_embeddings().weight.device
        gathers[layer] = index.to(device)[..., None].expand(-1, -1, hidden_size).contiguous()
        orig, valid = kept_orig, kept_valid
    return OracleSchedule(seen, gathers, widths), output


@contextlib.contextmanager
def oracle_language_model(model: torch.nn.Module, schedule: OracleSchedule) -> Iterator[None]:
    """While active, the language model's forward is the oracle loop (stock layers, kept tokens only)."""
    from transformers.cache_utils import DynamicCache
    from transformers.modeling_outputs import BaseModelOutputWithPast

    family = family_for(model)
    language_model = family.language_model(model)
    layers = family.layers(model)
    norm = language_model.norm

    def forward(*args, inputs_embeds=None, use_cache=None, **ignored):
        cache = DynamicCache(config=language_model.config) if use_cache else None
        hidden = inputs_embeds
        for index, layer in enumerate(layers):
            gather = schedule.gathers.get(index)
            if gather is not None:
                hidden = hidden.gather(1, gather)
            hidden = layer(hidden, past_key_values=cache, use_cache=use_cache, **schedule.layer_kwargs[index])
        return BaseModelOutputWithPast(last_hidden_state=norm(hidden), past_key_values=cache)

    language_model.forward = forward
    try:
        yield
    finally:
        del language_model.forward

"""The calibration pass: one SDPA forward per calibration batch, attention statistics per layer.

It reuses the runtime's hooks with a policy that prunes nothing and probes every layer: the
registered attention function computes, chunk by chunk, only the softmax rows of the text queries,
the visual queries and the last prompt token, and folds them into per-visual-token sums. Nothing
L×L is kept. The result is a :class:`~recipe_compiler.statistics.Statistics`.
"""
from __future__ import annotations

import json
from typing import Any, Callable, Sequence

import numpy as np
import torch

from runtime.adapters import model_fingerprint
from runtime.pruner import Policy, PruningHandle, Roles

from .calibration import CalibrationSet, load_image
from .distributed import SINGLE, Sharding, batches_of
from .statistics import Statistics

HEAD_REDUCTIONS = ("max", "mean")


class StatisticsPolicy(Policy):
    """Prunes nothing; at every layer records cross, self and last-row attention per visual token."""

    def __init__(self, num_layers: int, head_reduce: str = "max", prellm: bool = False, prellm_params: dict | None = None) -> None:
        self.probe_layers = tuple(range(num_layers))
        self.head_reduce = head_reduce
        self.num_layers = num_layers
        self.rows: list[dict] = []
        self.stage = None
        if prellm:  # pre-LLM scores from the same pass: vision hooks + the layer-0 input embeddings
            from runtime.prellm_stage import PreLLMStage

            self.stage = PreLLMStage("g-prune", params=prellm_params, capture={"attention", "features"})

    def attach(self, model: torch.nn.Module) -> list:
        return self.stage.attach(model) if self.stage is not None else []

    def on_inputs(self, embeds: torch.Tensor, roles: Roles) -> None:
        if self.stage is None:
            return
        self.stage.on_inputs(embeds)
        for entry in self._batch:
            entry["prellm"] = {}
        for image in self.stage.scores(roles):
            store = self._batch[image["row"]]["prellm"]
            for name in ("gprune", "fopru", "clssim"):
                part = image[name].float().cpu().numpy()
                store[name] = part if name not in store else np.concatenate([store[name], part])
        self.stage.on_inputs(None)

    def begin(self, roles: Roles) -> None:
        self._roles = roles
        self._batch = [
            {"cross": [None] * self.num_layers, "self": [None] * self.num_layers, "last": [None] * self.num_layers}
            for _ in range(roles.valid.shape[0])
        ]
        self.rows.extend(self._batch)
        for row, entry in enumerate(self._batch):
            entry["n_visual"] = int(roles.visual[row].sum())
            entry["n_text"] = int(roles.text[row].sum())
            entry["n_tokens"] = int(roles.valid[row].sum())

    def row_groups(self, layer: int, roles: Roles) -> torch.Tensor:
        last = torch.zeros_like(roles.text)
        last[:, -1] = True
        return torch.stack([roles.text, roles.visual, last], dim=1).float()

    def on_probe(self, layer: int, sums: torch.Tensor, roles: Roles) -> None:
        sums = sums.float().cpu()
        for row, entry in enumerate(self._batch):
            visual = roles.visual[row].cpu()
            columns = sums[row][:, visual]  # (3, v) in prompt order
            entry["cross"][layer] = (columns[0] / max(entry["n_text"], 1)).numpy()
            entry["self"][layer] = (columns[1] / max(entry["n_visual"], 1)).numpy()
            entry["last"][layer] = columns[2].numpy()


def collect_statistics(
    model: torch.nn.Module,
    processor: Any,
    calibration: CalibrationSet,
    *,
    format_prompt: Callable[[str], str] = lambda p: p,
    batch_size: int = 4,
    head_reduce: str = "max",
    progress: Callable[[int], None] | None = None,
    sharding: Sharding = SINGLE,
    prellm_params: dict | None = None,
) -> Statistics:
    """Run the calibration set through ``model`` and collect attention statistics at every layer.

    Args:
        model: a stock HF VLM (any attention implementation the runtime supports; SDPA is fastest).
        processor: the model's processor (images + text → input_ids, attention_mask, pixel_values).
        calibration: the validated samples.
        format_prompt: turns a user prompt into the model's chat format with its image placeholder.
        batch_size: samples per forward (left-padded batches give the same statistics).
        head_reduce: "max" (FitPrune) or "mean" over attention heads.
        progress: called with the number of samples finished after each batch.
        sharding: under torchrun, which global batches this rank runs; every rank gets the
            same :class:`Statistics` (rows gathered in global sample order).
        prellm_params: G-Prune ``threshold``, ``temperature``, ``steps`` for the recorded scores
            (default: G-Prune's 0.5, 0.03, 5).

    Returns:
        :class:`Statistics` with S = len(calibration) samples.

    Example:
        >>> stats = collect_statistics(m.model, m.processor, load_calibration(), format_prompt=m.format_prompt)  # doctest: +SKIP
    """
    if head_reduce not in HEAD_REDUCTIONS:
        raise ValueError(f"head_reduce must be one of {HEAD_REDUCTIONS}, got {head_reduce!r}")
    from runtime.adapters import adapter_for

    from runtime.prellm_stage import check_supported

    num_layers = len(adapter_for(model).layers(model))
    try:
        check_supported(model)
        prellm = True
    except (ValueError, AttributeError):
        prellm = False
    from runtime.prellm_stage import GPRUNE_DEFAULTS

    params = {**GPRUNE_DEFAULTS, **(prellm_params or {})}
    policy = StatisticsPolicy(num_layers, head_reduce, prellm=prellm, prellm_params=params)
    mine = []
    with PruningHandle(model, policy), torch.no_grad():
        for index, (_, batch) in sharding.my_batches(list(batches_of(calibration.samples, batch_size))):
            inputs = model_inputs(model, processor, batch, format_prompt)
            before = len(policy.rows)
            model(**inputs, use_cache=False, logits_to_keep=1)
            if len(policy.rows) != before + len(batch):
                raise RuntimeError("the calibration forward did not reach the pruning hooks (no image tokens?)")
            mine.append((index, policy.rows[before:]))
            if progress is not None:
                progress(len(batch))
    rows = [row for batch_rows in sharding.gather(mine) for row in batch_rows]
    stats = _assemble(rows, head_reduce, json.dumps(model_fingerprint(model), sort_keys=True), calibration.fingerprint())
    if stats.prellm:
        from dataclasses import replace

        stats = replace(stats, prellm_params=json.dumps(params, sort_keys=True))
    return stats


def input_device(model: torch.nn.Module) -> torch.device:
    """Where model inputs go: the device of the token embeddings (the first layer under a device map)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    return weight.device if weight is not None else next(model.parameters()).device


def model_inputs(model: torch.nn.Module, processor: Any, batch: Sequence, format_prompt: Callable[[str], str]) -> dict:
    """Processor inputs for one batch of samples (left padded), on the model's input device and dtype."""
    inputs = processor(
        images=[load_image(s) for s in batch],
        text=[format_prompt(s.prompt) for s in batch],
        return_tensors="pt",
        padding=True,
    )
    device = input_device(model)
    inputs = {k: v.to(device) if hasattr(v, "to") else v for k, v in inputs.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(next(model.parameters()).dtype)
    return inputs


def _assemble(rows: list[dict], head_reduce: str, model_fp: str, calibration_fp: str) -> Statistics:
    samples, layers = len(rows), len(rows[0]["cross"])
    width = max(r["n_visual"] for r in rows)
    arrays = {name: np.full((samples, layers, width), np.nan, dtype=np.float32) for name in ("cross", "self", "last")}
    for s, row in enumerate(rows):
        for name in arrays:
            arrays[name][s, :, : row["n_visual"]] = np.stack(row[name])
    prellm = {}
    if all("prellm" in r for r in rows):
        for name in ("gprune", "fopru", "clssim"):
            prellm[name] = np.full((samples, width), np.nan, dtype=np.float32)
            for s, row in enumerate(rows):
                prellm[name][s, : row["n_visual"]] = row["prellm"][name]
    return Statistics(
        prellm=prellm,
        cross=arrays["cross"],
        self_attn=arrays["self"],
        last=arrays["last"],
        n_visual=np.array([r["n_visual"] for r in rows], dtype=np.int64),
        n_text=np.array([r["n_text"] for r in rows], dtype=np.int64),
        n_tokens=np.array([r["n_tokens"] for r in rows], dtype=np.int64),
        head_reduce=head_reduce,
        model_fingerprint=model_fp,
        calibration_fingerprint=calibration_fp,
    )

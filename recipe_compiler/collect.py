"""The calibration pass: one SDPA forward per calibration batch, attention statistics per layer.

It reuses the runtime's hooks with a policy that prunes nothing and probes every layer: the
registered attention function computes, chunk by chunk, only the softmax rows of the text queries,
the visual queries and the last prompt token, and folds them into per-visual-token sums. Nothing
L×L is kept. The result is a :class:`~recipe_compiler.statistics.Statistics`.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Callable, Sequence

import numpy as np
import torch

from runtime.families import family_for, model_fingerprint
from runtime.methods.heads import HEAD_REDUCTIONS
from runtime.methods.stages import STAGES
from runtime.prellm_stage import PreLLMStage, supported_methods
from runtime.pruner import Policy, PruningHandle, Roles

from .calibration import CalibrationSet, load_image
from .errors import CalibrationDataError
from .distributed import SINGLE, Sharding, batches_of
from .statistics import PRELLM_SCORES, Statistics



STATISTICS_ROWS = ("all", "text")
"""Which query rows a calibration pass probes: every row (text, visual, last) or the text and last rows."""


class StatisticsPolicy(Policy):
    """Prunes nothing; at every layer records cross, self and last-row attention per visual token."""

    def __init__(self, num_layers: int, head_reduce: str = "max", prellm: bool | set = False, prellm_params: dict | None = None,
                 attention_layers: tuple | None = None, rows: str = "all", probe_dtype: str | None = None) -> None:
        if rows not in STATISTICS_ROWS:
            raise ValueError(f"rows must be one of {STATISTICS_ROWS}, got {rows!r}")
        # "text": only the text rows and the last row are probed (no visual query row: the probe
        # starts after the image), so self_attn is not recorded.
        self.visual_rows = rows == "all"
        # Only layers with attention rows are probed; the others' statistics stay NaN (Qwen3.5's linear attention).
        self.probe_layers = tuple(range(num_layers)) if attention_layers is None else tuple(attention_layers)
        self.head_reduce = head_reduce
        self.probe_dtype = probe_dtype  # None: float32 products; "model": the attention's own dtype
        self.num_layers = num_layers
        self.rows: list[dict] = []
        self.stage = None
        if prellm is not False:  # pre-LLM scores from the same pass: vision hooks + the layer-0 input embeddings
            capture = prellm if isinstance(prellm, set) else {"attention", "features"}  # the signals the model supports
            self.stage = PreLLMStage(None, params=prellm_params, capture=capture)  # records every stage's scores

    def attach(self, model: torch.nn.Module) -> list:
        return self.stage.attach(model) if self.stage is not None else []

    def on_inputs(self, embeds: torch.Tensor, roles: Roles) -> None:
        if self.stage is None:
            return
        self.stage.on_inputs(embeds)
        for entry in self._batch:
            entry["prellm"] = {}
        views: dict[int, int] = {}
        for image in self.stage.scores(roles):  # one entry per view, in prompt order
            store = self._batch[image["row"]]["prellm"]
            index = views[image["row"]] = views.get(image["row"], -1) + 1
            image["view"] = torch.full((image["positions"].numel(),), float(index))
            for name in PRELLM_SCORES:
                if name not in image:
                    continue
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
            entry["n_before"] = int(roles.n_before[row])

    def row_groups(self, layer: int, roles: Roles) -> torch.Tensor:
        last = torch.zeros_like(roles.text)
        last[:, -1] = True
        groups = [roles.text, roles.visual, last] if self.visual_rows else [roles.text, last]
        return torch.stack(groups, dim=1).float()

    def on_probe(self, layer: int, sums: torch.Tensor, roles: Roles) -> None:
        sums = sums.float().cpu()
        for row, entry in enumerate(self._batch):
            visual = roles.visual[row].cpu()
            columns = sums[row][:, visual]  # (groups, v) in prompt order
            entry["cross"][layer] = (columns[0] / max(entry["n_text"], 1)).numpy()
            if self.visual_rows:
                entry["self"][layer] = (columns[1] / max(entry["n_visual"], 1)).numpy()
            entry["last"][layer] = columns[-1].numpy()


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
    rows: str = "all",
    probe_dtype: str | None = None,
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
        prellm_params: the parameters the recorded pre-LLM scores depend on (each stage's
            ``score_params``: G-Prune ``threshold``, ``temperature``, ``steps``, default 0.5, 0.03,
            5; the FoPru ``feature_layer``, default the model's).
        rows: ``"all"`` (text, visual and last-token query rows: every objective and scorer) or
            ``"text"`` (text and last-token rows only: the ``text`` objective's statistics, with
            ``self_attn`` None; the probes skip every visual query row).
        probe_dtype: None (default): the probes' ``q·kᵀ`` products in float32 whatever the model's
            dtype; ``"model"``: in the attention's own dtype (bf16 on a bf16 model; softmax and sums
            stay float32). The README states the error this costs against float32.

    Returns:
        :class:`Statistics` with S = len(calibration) samples.

    Example:
        >>> stats = collect_statistics(m.model, m.processor, load_calibration(), format_prompt=m.format_prompt)  # doctest: +SKIP
    """
    if head_reduce not in HEAD_REDUCTIONS:
        raise ValueError(f"head_reduce must be one of {tuple(HEAD_REDUCTIONS)}, got {head_reduce!r}")
    check_inputs(model, processor, calibration, format_prompt=format_prompt)  # before any forward
    if probe_dtype not in (None, "model"):
        raise ValueError(f"probe_dtype must be None (float32 products) or 'model', got {probe_dtype!r}")
    policy, params = statistics_policy(model, head_reduce, prellm_params, rows, probe_dtype)
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
    gathered = [row for batch_rows in sharding.gather(mine) for row in batch_rows]
    stats = _assemble(gathered, head_reduce, json.dumps(model_fingerprint(model), sort_keys=True), calibration.fingerprint(),
                      visual_rows=policy.visual_rows)
    if stats.prellm:
        from dataclasses import replace

        stats = replace(stats, prellm_params=json.dumps(params, sort_keys=True))
    return stats


def statistics_policy(model: torch.nn.Module, head_reduce: str = "max", prellm_params: dict | None = None,
                      rows: str = "all", probe_dtype: str | None = None) -> tuple["StatisticsPolicy", dict]:
    """The calibration pass's policy for ``model`` (every attention layer probed, the pre-LLM scores
    of every stage the model supports) and the stage parameters those scores depend on.

    :func:`collect_statistics` runs it; ``bench/compile.py`` times it against a plain forward.

    Example:
        >>> policy, params = statistics_policy(m.model)   # doctest: +SKIP
    """
    family = family_for(model)
    num_layers = len(family.layers(model))
    stages = [STAGES[m] for m in supported_methods(model)]
    prellm = set().union(*(stage.signals for stage in stages))
    prellm = prellm if stages else False  # an empty set still records the stages that read no signal (G-Prune)
    params = {key: stage.defaults[key] for stage in stages for key in stage.score_params if key in stage.defaults}
    params.update(prellm_params or {})
    if any("feature_layer" in stage.score_params for stage in stages):  # recorded as the hidden_states index, so -2 and depth-1 compare equal
        params["feature_layer"] = family.resolve_feature_layer(model, params.get("feature_layer"))
    else:
        params.pop("feature_layer", None)
    policy = StatisticsPolicy(num_layers, head_reduce, prellm=prellm, prellm_params=params,
                              attention_layers=family.attention_layers(model), rows=rows, probe_dtype=probe_dtype)
    return policy, params


def check_inputs(
    model: torch.nn.Module, processor: Any, calibration: CalibrationSet, *, format_prompt: Callable[[str], str] = lambda p: p
) -> None:
    """Check that every calibration sample makes a valid input for ``model``, without running it.

    :func:`check_prompts` with the language model's ``max_position_embeddings``.
    :func:`collect_statistics` and :func:`recipe_compiler.evaluate.evaluate_recipes` call this
    before their first forward, so a bad entry costs no model time.

    Args:
        model: the HF VLM the samples are for.
        processor: its processor.
        calibration: the validated samples.
        format_prompt: the model's chat template for one image and a prompt.

    Raises:
        CalibrationDataError: one line naming the first bad entry and the fix.

    Example:
        >>> check_inputs(m.model, m.processor, load_calibration(), format_prompt=m.format_prompt)  # doctest: +SKIP
    """
    limit = getattr(family_for(model).text_config(model), "max_position_embeddings", None)
    check_prompts(processor, calibration, format_prompt=format_prompt, max_positions=limit)


def check_prompts(
    processor: Any, calibration: CalibrationSet, *, format_prompt: Callable[[str], str] = lambda p: p,
    max_positions: int | None = None,
) -> None:
    """Check every sample against the processor and the model's positions; needs no weights.

    Each sample goes through the processor on its own, as the forward will get it. A sample
    fails when its prompt is empty or only invisible characters, when the processor rejects it
    (for example a prompt that contains the image placeholder itself) or when its input, prompt
    and image tokens together, is longer than ``max_positions``. Long prompts are refused rather
    than cut, because cutting would silently calibrate on a different prompt. The CLIs run this
    with :class:`recipe_compiler.models.ModelPlan`'s processor and positions before any weight
    is read.

    Args:
        processor: the model's processor.
        calibration: the validated samples.
        format_prompt: the model's chat template for one image and a prompt.
        max_positions: the language model's ``max_position_embeddings`` (``None``: no limit).

    Raises:
        CalibrationDataError: one line naming the first bad entry and the fix.

    Example:
        >>> plan = prepare_model("tiny-llava")                                                   # doctest: +SKIP
        >>> check_prompts(plan.processor, load_calibration(), format_prompt=plan.format_prompt,
        ...               max_positions=plan.max_positions)                                       # doctest: +SKIP
    """
    from .calibration import prompt_problem

    limit = max_positions
    tokenizer_log = logging.getLogger("transformers.tokenization_utils_base")
    level = tokenizer_log.level
    tokenizer_log.setLevel(logging.ERROR)  # its "longer than the maximum" warning; ours names the entry
    try:
        for sample in calibration.samples:
            where = sample.describe()
            problem = prompt_problem(sample.prompt)
            if problem is not None:
                raise CalibrationDataError(f"{where}: the prompt is {problem}; write the question or instruction for this image")
            try:
                inputs = processor(images=[load_image(sample)], text=[format_prompt(sample.prompt)], return_tensors="pt")
            except (ValueError, TypeError, IndexError, RuntimeError) as err:
                reason = " ".join(str(err).split())[:200] or type(err).__name__
                raise CalibrationDataError(
                    f"{where}: the model's processor rejects it ({reason}); fix the prompt or image (the prompt must not "
                    "contain the image placeholder) or remove the entry"
                ) from None
            length = int(inputs["input_ids"].shape[-1])
            if limit and length > limit:
                prompt_tokens = len(processor.tokenizer(sample.prompt, add_special_tokens=False)["input_ids"])
                raise CalibrationDataError(
                    f"{where}: the prompt is too long: with the image it makes {length} tokens, more than the model's "
                    f"{limit} positions (max_position_embeddings); shorten the prompt ({prompt_tokens} tokens) by at "
                    f"least {length - limit} tokens or remove the entry"
                )
    finally:
        tokenizer_log.setLevel(level)


def input_device(model: torch.nn.Module) -> torch.device:
    """Where model inputs go: the device of the token embeddings (the first layer under a device map)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    return weight.device if weight is not None else next(model.parameters()).device


def model_inputs(model: torch.nn.Module, processor: Any, batch: Sequence, format_prompt: Callable[[str], str]) -> dict:
    """Processor inputs for one batch of samples (left padded), on the model's input device and dtype."""
    from .families import family_of

    texts = [format_prompt(s.prompt) for s in batch]
    inputs = processor(
        images=family_of(model.config).batch_images([load_image(s) for s in batch], texts),
        text=texts,
        return_tensors="pt",
        padding=True,
    )
    device = input_device(model)
    inputs = {k: v.to(device) if hasattr(v, "to") else v for k, v in inputs.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(next(model.parameters()).dtype)
    return inputs


def _assemble(rows: list[dict], head_reduce: str, model_fp: str, calibration_fp: str, visual_rows: bool = True) -> Statistics:
    samples, layers = len(rows), len(rows[0]["cross"])
    width = max(r["n_visual"] for r in rows)
    names = ("cross", "self", "last") if visual_rows else ("cross", "last")
    arrays = {name: np.full((samples, layers, width), np.nan, dtype=np.float32) for name in names}
    for s, row in enumerate(rows):
        for name in arrays:
            for layer, values in enumerate(row[name]):
                if values is not None:  # None: a layer without attention, left NaN
                    arrays[name][s, layer, : row["n_visual"]] = values
    prellm = {}
    if all("prellm" in r for r in rows):
        for name in [n for n in PRELLM_SCORES if all(n in r["prellm"] for r in rows)]:
            prellm[name] = np.full((samples, width), np.nan, dtype=np.float32)
            for s, row in enumerate(rows):
                prellm[name][s, : row["n_visual"]] = row["prellm"][name]
    return Statistics(
        prellm=prellm,
        cross=arrays["cross"],
        self_attn=arrays.get("self"),
        last=arrays["last"],
        n_visual=np.array([r["n_visual"] for r in rows], dtype=np.int64),
        n_text=np.array([r["n_text"] for r in rows], dtype=np.int64),
        n_tokens=np.array([r["n_tokens"] for r in rows], dtype=np.int64),
        n_before=np.array([r["n_before"] for r in rows], dtype=np.int64),
        head_reduce=head_reduce,
        model_fingerprint=model_fp,
        calibration_fingerprint=calibration_fp,
    )

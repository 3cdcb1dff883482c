"""The production matrix: every family × recipe kind × production shape, through ``generate()``.

Each cell is one user call: a built-in tiny model (:mod:`families`), a recipe of one kind, and the
inputs a user sends in one of the production shapes (batch 1 unpadded, equal-length batch,
left-padded batch, two images in one prompt, a text-only row beside an image row; greedy with 1 and
8 new tokens, beam search). Every cell asserts what a user relies on:

* no exception, and a kind the family cannot run is refused at ``apply()`` with
  :class:`runtime.RecipeMismatchError` (never a crash inside ``generate``);
* keep-all ⇒ sequences and every step's logits bit-identical to the unpatched model;
* pruned ⇒ cached generation ≡ a no-cache recomputation with the same keep sets (≤ 1e-4 in fp32;
  beam search: each returned sequence's score);
* the visual tokens entering each layer, per row, and every cache layer's length are what the
  recipe implies (fixed-ratio stages: ``round_half_up(r·n)`` per view; schedules: the recipe's counts
  scaled to the row's image, relative to a stage's survivors).

A new family joins by one line in ``families.FAMILIES``; a new recipe kind by one entry in
:func:`recipe_kinds`. Run only the matrix with ``pytest tests/test_matrix.py``.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from families import FamilyCase, family_params
from runtime import Recipe, RecipeMismatchError
from runtime.families import family_for, model_fingerprint
from recipe_compiler.search import SEARCHES
from runtime.methods.scorers import SCORERS
from runtime.methods.stages import STAGES
from runtime.prellm import stage_count
from runtime.prellm_stage import unsupported_reason

TOLERANCE = 1e-4
SCHEDULE = (1.0, 0.75, 0.75, 0.5, 0.5, 0.25, 0.25, 0.125)  # prunes on entry to layer 1, 3, 5 and 7
STAGE_RATIO = 0.5
KINDS = (
    "keep-all",
    "schedule-fitprune",
    "schedule-text-mean",
    "schedule-last-token",
    "schedule-random",
    *(f"stage-{method}" for method in STAGES.names()),
    "stage+schedule",
    *(f"method-{name}" for name, search in SEARCHES.items() if search.is_method),  # the in-LLM peers, paper defaults
)


@dataclass(frozen=True)
class Shape:
    """A production call: rows of (question, image indices) and how it decodes."""

    rows: tuple[tuple[str, tuple[int, ...]], ...]
    new_tokens: int
    beams: int = 1


_ASK = "What is in the picture?"
_LONG = "Describe every colour and shape you can see in this picture, from left to right."
_SHAPE_ROWS = {
    "b1": ((_ASK, (0,)),),
    "b2equal": ((_ASK, (0,)), (_ASK, (2,))),  # same prompt, two images of one size: no padding
    "b2padded": ((_LONG, (0,)), ("Count?", (1,))),  # lengths and image sizes differ: left padding
    "twoimages": (("Compare the two pictures.", (0, 1)),),
    "mixedtext": ((_ASK, (0,)), ("What is two plus two?", ())),  # a text-only row beside an image row
}
SHAPES = {
    "b1-greedy1": Shape(_SHAPE_ROWS["b1"], 1),
    "b1-greedy8": Shape(_SHAPE_ROWS["b1"], 8),
    "b1-beam": Shape(_SHAPE_ROWS["b1"], 8, beams=2),
    "b2equal-greedy8": Shape(_SHAPE_ROWS["b2equal"], 8),
    "b2padded-greedy8": Shape(_SHAPE_ROWS["b2padded"], 8),
    "b2padded-beam": Shape(_SHAPE_ROWS["b2padded"], 8, beams=2),
    "twoimages-greedy8": Shape(_SHAPE_ROWS["twoimages"], 8),
    "mixedtext-greedy8": Shape(_SHAPE_ROWS["mixedtext"], 8),
}


# ------------------------------------------------------------------------------------- recipes


def _counts(v: int, layers: int, ratios=SCHEDULE, cuts=None) -> np.ndarray:
    """The schedule's counts; a layer a scoring cut may not enter (``cuts``: the family's) keeps the count before it."""
    ratios = [ratios[min(i, len(ratios) - 1)] for i in range(layers)]
    counts = [int(math.floor(r * v + 0.5)) for r in ratios]
    for layer in range(1, layers):
        if cuts is not None and layer not in cuts:
            counts[layer] = counts[layer - 1]
    return np.array(counts)


@functools.lru_cache(maxsize=None)
def recipe_kinds(case: FamilyCase) -> dict:
    """kind → the recipe of that kind for ``case``'s model, or the reason the family refuses it."""
    model = case.load().model
    fp = model_fingerprint(model)
    v, layers = fp["visual_tokens"], fp["num_layers"]
    cuts = set(family_for(model).cut_layers(model))  # layers after an attention layer (all but 0 for most families)
    schedule = _counts(v, layers, cuts=cuts)
    stage = {"keep_ratio": STAGE_RATIO, "params": {}}
    out = {
        "keep-all": Recipe.keep_all(fp),
        "schedule-fitprune": Recipe(keep_count=schedule, scorer="fitprune", fingerprint=fp),
        "schedule-text-mean": Recipe(keep_count=schedule, scorer="text-mean", fingerprint=fp, head_reduce="mean"),
        "schedule-last-token": Recipe(keep_count=schedule, scorer="last-token", fingerprint=fp, head_reduce="mean"),
        "schedule-random": Recipe(keep_count=schedule, scorer="random", fingerprint=fp, head_reduce="mean"),
        "stage+schedule": Recipe(keep_count=schedule, scorer="fitprune", fingerprint=fp, pre_llm={"method": "g-prune", **stage}),
    }
    for name, search in SEARCHES.items():
        if search.is_method:
            out[f"method-{name}"] = Recipe(keep_count=search.example(layers, v), scorer=search.scorer, fingerprint=fp)
    for method in STAGES.names():
        if not STAGES[method].fixed_ratio and method != "cls-inflection":  # a count of its own, no parameters
            out[f"stage-{method}"] = Recipe(keep_count=np.full(layers, v), scorer="fitprune", fingerprint=fp,
                                            pre_llm={"method": method, "params": {}})
        elif method == "cls-inflection":
            k = 2
            counts = np.array([v] * k + [int(math.floor(STAGE_RATIO * v + 0.5))] * (layers - k))
            spec = {"method": method, "params": {"stage2_layer": k, "stage2_ratio": STAGE_RATIO}}
            out[f"stage-{method}"] = Recipe(keep_count=counts, scorer="text-mean", fingerprint=fp, pre_llm=spec)
        else:
            out[f"stage-{method}"] = Recipe(keep_count=np.full(layers, v), scorer="fitprune", fingerprint=fp,
                                            pre_llm={"method": method, **stage})
    return out


# ------------------------------------------------------------------------------------- inputs


@functools.lru_cache(maxsize=None)
def _images(case: FamilyCase) -> tuple:
    """Three photographs from the shipped set: sizes 0, 1 and 0 again (other content)."""
    from recipe_compiler.calibration import load_calibration, load_image

    samples = load_calibration().samples
    sizes = (case.image_sizes[0], case.image_sizes[1], case.image_sizes[0])
    return tuple(load_image(samples[i]).resize(size, Image.BICUBIC) for i, size in zip((0, 3, 6), sizes))


def _prompt(case: FamilyCase, loaded, question: str, n_images: int) -> str:
    text = loaded.format_prompt(question)
    assert case.image_marker in text, f"{case.name}: its prompt template has no {case.image_marker!r}"
    return text.replace(case.image_marker, case.image_marker * n_images)


@functools.lru_cache(maxsize=None)
def _inputs(case: FamilyCase, shape_name: str) -> dict:
    loaded = case.load()
    shape = SHAPES[shape_name]
    images = [_images(case)[i] for _, indices in shape.rows for i in indices]
    texts = [_prompt(case, loaded, q, len(indices)) for q, indices in shape.rows]
    kwargs = {"images": images} if images else {}
    return dict(loaded.processor(text=texts, return_tensors="pt", padding=True, **kwargs))


def _generate_kwargs(shape: Shape) -> dict:
    common = dict(max_new_tokens=shape.new_tokens, do_sample=False, return_dict_in_generate=True)
    if shape.beams > 1:
        return dict(common, num_beams=shape.beams, num_return_sequences=shape.beams, output_scores=True,
                    length_penalty=0.0, early_stopping=True)
    return dict(common, output_logits=True)


@functools.lru_cache(maxsize=None)
def _unpatched(case: FamilyCase, shape_name: str):
    model = case.load().model
    with torch.no_grad():
        return model.generate(**_inputs(case, shape_name), **_generate_kwargs(SHAPES[shape_name]))


# ------------------------------------------------------------------------------------- checks


def _recompute_logits(model, inputs: dict, sequences: torch.Tensor) -> torch.Tensor:
    """No-cache logits of every position of ``sequences`` (the keep sets are forced by the caller)."""
    prompt = inputs["input_ids"].shape[1]
    rows, extra = sequences.shape[0], sequences.shape[1] - prompt
    repeat = rows // inputs["input_ids"].shape[0]  # beam search expands every input row
    grow = lambda t, fill: torch.cat([t.repeat_interleave(repeat, dim=0), torch.full((rows, extra), fill, dtype=t.dtype)], 1)  # noqa: E731
    kwargs = {"input_ids": sequences, "attention_mask": grow(inputs["attention_mask"], 1)}
    for key in ("mm_token_type_ids", "token_type_ids"):  # Gemma 3's image blocks are marked by token_type_ids
        if key in inputs:
            kwargs[key] = grow(inputs[key], 0)
    for key in ("pixel_values", "image_sizes", "image_grid_thw"):
        if key in inputs:
            kwargs[key] = inputs[key]
    if repeat > 1 and "pixel_values" in kwargs:
        kwargs.update(_expand_images(model, inputs, repeat))
    # Positions exactly as generate() builds them (M-RoPE rows for Qwen-VL, padding-aware for all).
    kwargs["position_ids"] = model._prepare_position_ids_for_generation(sequences, dict(kwargs))
    return model(**kwargs, use_cache=False).logits


def _expand_images(model, inputs: dict, repeat: int) -> dict:
    """The image inputs of ``inputs`` for its rows each repeated ``repeat`` times (as beam search
    expands them): every row's whole group of images, tiles or patches repeated, row after row.

    ``pixel_values`` rows are images (LLaVA, LLaVA-NeXT), equal-sized tiles (InternVL) or the
    patches of each ``image_grid_thw`` image (Qwen-VL); ``image_sizes`` / ``image_grid_thw`` are per image.
    """
    placeholders = inputs["input_ids"] == family_for(model).image_token_id(model)
    rows = placeholders.shape[0]
    images = [len(_image_runs(row, placeholders)) for row in range(rows)]
    pixels = inputs["pixel_values"]
    if "image_grid_thw" in inputs:  # Qwen: flat patches per image
        units, chunks = images, list(torch.split(pixels, inputs["image_grid_thw"].prod(-1).tolist()))
    elif pixels.shape[0] == sum(images):  # one pixel_values row per image
        units, chunks = images, list(pixels.split(1))
    else:  # one row per tile, every tile the same number of placeholders
        per_unit = int(placeholders.sum()) // pixels.shape[0]
        units, chunks = [int(n) // per_unit for n in placeholders.sum(dim=1).tolist()], list(pixels.split(1))
    assert sum(units) == len(chunks), "the image inputs do not split into the prompt's rows"

    def grow(items: list, counts: list[int]) -> list:
        out, start = [], 0
        for count in counts:
            out.extend(items[start:start + count] * repeat)
            start += count
        return out

    out = {"pixel_values": torch.cat(grow(chunks, units))}
    for key in ("image_sizes", "image_grid_thw"):
        if key in inputs:
            out[key] = torch.stack(grow(list(inputs[key]), images))
    return out


def _image_runs(row: torch.Tensor, image: torch.Tensor) -> list[torch.Tensor]:
    positions = torch.nonzero(image[row]).flatten()
    if positions.numel() == 0:
        return []
    breaks = torch.nonzero(positions[1:] != positions[:-1] + 1).flatten() + 1
    return list(torch.tensor_split(positions, breaks))


def _expected_visual(case: FamilyCase, model, recipe: Recipe, inputs: dict, request, beams: int) -> list[list[int]]:
    """Per input row, the visual tokens the recipe implies entering each layer."""
    ids = inputs["input_ids"]
    adapter = family_for(model)
    prunable = adapter.prunable_visual_tokens(model, ids, {k: inputs[k] for k in ("image_sizes",) if k in inputs})
    placeholders = ids == adapter.image_token_id(model)
    method = recipe.pre_llm.get("method", "none")
    expected = []
    for row in range(ids.shape[0]):
        per_image = [int(prunable[row, run].sum()) for run in _image_runs(row, placeholders)]
        n = sum(per_image)
        if method == "none":
            survivors = n
        elif not STAGES[method].fixed_ratio:  # the count is per image and data-dependent: take the count kept
            survivors = int(request.visual_per_layer[0][row * beams])
            assert (0 < survivors <= n) if n else survivors == 0
        else:
            survivors = sum(stage_count(recipe.pre_llm["keep_ratio"], size)
                            for count in per_image for size in case.view_sizes(count, model.config))
        expected.append([int(c) for c in recipe.keep_counts_for(survivors)] if n else [0] * recipe.num_layers)
    return expected


def _check_counts_and_cache(case, model, recipe, inputs, request, output, beams):
    expected = _expected_visual(case, model, recipe, inputs, request, beams)
    expected = [row for row in expected for _ in range(beams)]  # generate expands each row per beam
    visual = torch.stack(request.visual_per_layer, dim=1).tolist()
    assert visual == expected, "visual tokens entering each layer differ from what the recipe implies"

    prompt = inputs["input_ids"].shape[1]
    fed = output.sequences.shape[1] - prompt - 1  # the last generated token is never fed back
    real = inputs["attention_mask"].sum(dim=1).repeat_interleave(beams).tolist()
    n = request.roles.n_visual_input.tolist()
    first = min(recipe.pruning_layers + ([0] if recipe.pre_llm.get("method", "none") != "none" else []))
    for layer, cache_layer in enumerate(output.past_key_values.layers):
        if getattr(cache_layer, "keys", None) is None:  # a linear-attention layer: fixed-size state, no per-token KV
            assert type(cache_layer).__name__ == "LinearAttentionLayer", f"layer {layer}: {type(cache_layer).__name__} has no keys"
            assert all(state is not None for state in cache_layer.recurrent_states.values())
            continue
        if layer < first:
            width = prompt
        else:
            width = max(r - v + e[layer] for r, v, e in zip(real, n, expected))
        window = getattr(cache_layer, "sliding_window", None)  # a sliding-window layer keeps the last window − 1 it was given
        length = width + fed if window is None else min(width + fed, window - 1)
        assert cache_layer.keys.shape[2] == length, f"layer {layer}: cache length differs from the recipe's"


def _check_recompute(model, handle, inputs, output, shape: Shape):
    prompt = inputs["input_ids"].shape[1]
    steps = output.sequences.shape[1] - prompt
    with handle.replay(handle.last_request.selection):
        # A pruned forward returns logits for the kept positions only; the last prompt token and
        # everything after it are always kept, so the last ``steps`` positions are the decode steps.
        logits = _recompute_logits(model, inputs, output.sequences[:, :-1])[:, -steps:]
    if shape.beams == 1:
        for step in range(steps):
            gap = float((logits[:, step] - output.logits[step]).abs().max())
            assert gap <= TOLERANCE, f"step {step}: cached generation differs from recomputation by {gap:.2e}"
        return
    logp = torch.log_softmax(logits.float(), dim=-1)
    tokens = output.sequences[:, prompt:]
    picked = logp.gather(-1, tokens[..., None])[..., 0]
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    for row in range(tokens.shape[0]):
        ends = [i for i, t in enumerate(tokens[row].tolist()) if t in eos]
        length = ends[0] + 1 if ends else tokens.shape[1]
        score = float(picked[row, :length].sum())
        gap = abs(score - float(output.sequences_scores[row]))
        assert gap <= TOLERANCE, f"beam {row}: score {output.sequences_scores[row]:.6f} vs recomputed {score:.6f}"


# ------------------------------------------------------------------------------------- the cells


@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", family_params())
def test_cell(case: FamilyCase, kind: str, shape_name: str):
    loaded = case.load()
    model = loaded.model
    recipe = recipe_kinds(case)[kind]
    shape = SHAPES[shape_name]
    method = recipe.pre_llm.get("method", "none")
    reason = unsupported_reason(model, method) if method != "none" else None
    if reason is None and recipe.pruning_layers and SCORERS[recipe.scorer].unsupported_reason(model) is not None:
        reason, method = SCORERS[recipe.scorer].unsupported_reason(model), recipe.scorer  # a peer's scorer the family cannot run
    attention = set(family_for(model).attention_layers(model))
    if reason is None and SCORERS[recipe.scorer].attention_probe and any(layer - 1 not in attention for layer in recipe.pruning_layers):
        reason, method = "a probe on a layer without attention", "no attention rows"  # e.g. a paper's layer on Qwen3.5
    if reason is not None:  # the family cannot run this stage: refused at apply, nothing installed
        hooks_before = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
        with pytest.raises(RecipeMismatchError, match=method):
            recipe.apply(model)
        assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == hooks_before
        assert getattr(model, "_recipe_runtime_handle", None) is None
        return

    inputs = _inputs(case, shape_name)
    with recipe.apply(model) as handle, torch.no_grad():
        output = model.generate(**inputs, **_generate_kwargs(shape))
        if kind == "keep-all":
            reference = _unpatched(case, shape_name)
            assert torch.equal(output.sequences, reference.sequences)
            steps = output.scores if shape.beams > 1 else output.logits
            for step, (a, b) in enumerate(zip(steps, reference.scores if shape.beams > 1 else reference.logits)):
                assert torch.equal(a, b), f"decode step {step} is not bit-identical to the unpatched model"
            return
        request = handle.last_request
        assert request is not None, "a request with image tokens passed through unpruned"
        _check_counts_and_cache(case, model, recipe, inputs, request, output, shape.beams)
        _check_recompute(model, handle, inputs, output, shape)

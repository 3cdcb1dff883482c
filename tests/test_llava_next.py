"""LLaVA-NeXT (anyres) on the built-in tiny-llava-next: identity, cache consistency, newlines, CLI.

The batch pairs a square 512x512 image (64 base + 16x16 grid + 16 newlines = 336 placeholders)
with a 451x300 one (fewer: the grid is unpadded to the image's aspect ratio), with prompts of
different lengths, so the batch is left-padded and its rows carry different visual counts.
Newline positions are computed here independently of the runtime, by running the model's own
``pack_image_features`` on coordinate-coded dummy features.
"""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from recipe_compiler.calibration import load_image
from runtime import Recipe, RecipeMismatchError
from runtime.log import LOGGER_NAME
from runtime.families import family_for, model_fingerprint
from conftest import offline_hub  # noqa: E402

GREEDY = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
V_REF = 320  # 64x64 reference image: 64 base + 16x16 grid (its 16 newlines are not counted)
# Drop at three layers, down to nothing: every prunable token goes, the newlines must stay.
PRUNED = [V_REF, V_REF, 200, 200, 90, 90, 0, 0]
SAMPLES = (0, 2)  # astronaut 512x512 and chelsea 451x300


@pytest.fixture(scope="module")
def nxt():
    from recipe_compiler.models import build_tiny_llava_next

    return build_tiny_llava_next(seed=0, attn_implementation="sdpa")


@pytest.fixture(scope="module")
def nxt_eager():
    from recipe_compiler.models import build_tiny_llava_next

    return build_tiny_llava_next(seed=0, attn_implementation="eager")


@pytest.fixture(scope="module")
def batch(nxt, calibration):
    samples = [calibration.samples[i] for i in SAMPLES]
    prompts = [nxt.format_prompt(samples[0].prompt), nxt.format_prompt("Which animal? Answer briefly, please.")]
    inputs = nxt.processor(images=[load_image(s) for s in samples], text=prompts, return_tensors="pt", padding=True)
    assert (inputs["attention_mask"] == 0).any(), "the batch must be left-padded"
    assert inputs["pixel_values"].dim() == 5
    return inputs


def _image_newlines(model, size) -> torch.Tensor:
    """Bool over one image's placeholders: True at its newline tokens (the model's own packing)."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    config = model.config
    side = config.vision_config.image_size // config.vision_config.patch_size
    crops = image_size_to_num_patches(list(size), config.image_grid_pinpoints, config.vision_config.image_size)
    coded = torch.arange(crops * side * side, dtype=torch.float64).view(crops, side * side, 1)
    packed, _ = model.model.pack_image_features([coded], [list(size)], "default", image_newline=torch.tensor([-1.0], dtype=torch.float64))
    return packed[0][:, 0] == -1


def _layout(model, inputs):
    """Per row: (placeholder positions, newline positions, prunable count), independent of the runtime."""
    sizes = iter(inputs["image_sizes"].tolist())
    rows = []
    for ids in inputs["input_ids"]:
        positions = torch.nonzero(ids == model.config.image_token_id).flatten()
        flags, used = [], 0
        while used < len(positions):
            flags.append(_image_newlines(model, next(sizes)))
            used += len(flags[-1])
        newline = torch.cat(flags)
        assert len(newline) == len(positions)
        rows.append((positions, positions[newline], int((~newline).sum())))
    return rows


def _round_half_up(keep: int, n: int, v_ref: int = V_REF) -> int:
    return (2 * keep * n + v_ref) // (2 * v_ref)


def test_tiny_llava_next_has_distinct_per_image_counts_and_the_reference_unit(nxt, batch):
    layout = _layout(nxt.model, batch)
    assert [len(p) for p, _, _ in layout] == [336, 234]
    assert [n for _, _, n in layout] == [320, 224]
    assert model_fingerprint(nxt.model)["visual_tokens"] == V_REF
    assert model_fingerprint(nxt.model)["model_type"] == "llava_next"
    other = type(nxt.model.config).from_dict(nxt.model.config.to_dict())
    other.image_grid_pinpoints = [[32, 64], [64, 32], [64, 64]]  # same reference size, other grids
    with torch.device("meta"):
        moved = type(nxt.model)(other)
    assert model_fingerprint(moved)["config_hash"] != model_fingerprint(nxt.model)["config_hash"]
    adapter = family_for(nxt.model)
    prunable = adapter.prunable_visual_tokens(nxt.model, batch["input_ids"], dict(batch))
    with torch.no_grad():  # what generate() hands the base model at prefill instead of image_sizes
        encoded = nxt.model.model.get_image_features(batch["pixel_values"], batch["image_sizes"], return_dict=True)
    from_features = adapter.prunable_visual_tokens(nxt.model, batch["input_ids"], {"mm_encoder_outputs": {"image": encoded}})
    assert torch.equal(prunable, from_features)
    for row, (positions, newlines, n) in enumerate(layout):
        assert int(prunable[row].sum()) == n and not prunable[row, newlines].any()


@pytest.mark.parametrize("model_name", ["nxt", "nxt_eager"])
def test_keep_all_recipe_is_bit_identical_at_prefill_and_every_decode_step(request, batch, model_name):
    model = request.getfixturevalue(model_name).model
    with torch.no_grad():
        reference = model(**batch).logits
        reference_gen = model.generate(**batch, **GREEDY)
        with Recipe.keep_all(model_fingerprint(model)).apply(model):
            patched = model(**batch).logits
            patched_gen = model.generate(**batch, **GREEDY)
    assert torch.equal(patched, reference)
    assert torch.equal(patched_gen.sequences, reference_gen.sequences)
    assert len(patched_gen.logits) == 6
    for step, (a, b) in enumerate(zip(patched_gen.logits, reference_gen.logits)):
        assert torch.equal(a, b), f"decode step {step} differs"


def test_pruned_cached_generation_equals_no_cache_recomputation_and_caches_match_the_recipe(nxt, batch):
    model = nxt.model
    recipe = Recipe(keep_count=np.array(PRUNED), scorer="fitprune", fingerprint=model_fingerprint(model))
    with recipe.apply(model) as handle, torch.no_grad():
        generated = model.generate(**batch, **GREEDY)
        selection = handle.last_request.selection
        worst = 0.0
        with handle.replay(selection):  # forward() finds the newlines from image_sizes, generate() from features
            for step in range(6):
                length = batch["input_ids"].shape[1] + step
                mask = torch.cat([batch["attention_mask"], torch.ones(2, step, dtype=torch.long)], dim=1)
                logits = model(
                    input_ids=generated.sequences[:, :length],
                    attention_mask=mask,
                    pixel_values=batch["pixel_values"],
                    image_sizes=batch["image_sizes"],
                    position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                    use_cache=False,
                ).logits[:, -1]
                worst = max(worst, float((logits - generated.logits[step]).abs().max()))
    assert worst <= 1e-4

    # Each row keeps round_half_up(keep · n / v_ref) of its n prunable tokens, plus all its newlines.
    layout = _layout(model, batch)
    real = batch["attention_mask"].sum(dim=1).tolist()
    prompt = batch["input_ids"].shape[1]
    cache = generated.past_key_values
    for layer, keep in enumerate(PRUNED):
        length = cache.layers[layer].keys.shape[2]
        if layer < 2:
            expected = prompt + 5
        else:
            expected = max(r - n + _round_half_up(keep, n) for r, (_, _, n) in zip(real, layout)) + 5
        assert length == expected, f"layer {layer}: cache holds {length}, recipe implies {expected}"


@pytest.mark.parametrize("scorer", ["fitprune", "text-mean", "last-token"])
def test_newlines_survive_every_recipe_and_images_keep_their_share(nxt, batch, scorer):
    model = nxt.model
    recipe = Recipe(keep_count=np.array(PRUNED), scorer=scorer, fingerprint=model_fingerprint(model))
    layout = _layout(model, batch)
    with recipe.apply(model) as handle, torch.no_grad():
        model.generate(**batch, max_new_tokens=1, do_sample=False)
        request = handle.last_request
    survivors, valid = request.kept[max(request.kept)]
    for row, (positions, newlines, n) in enumerate(layout):
        kept = set(survivors[row][valid[row]].tolist())
        assert set(newlines.tolist()) <= kept, "a row-end newline token was pruned"
        text = set(request.roles.orig_index[row][request.roles.text[row]].tolist())
        assert text and not text & set(positions.tolist()), "an image placeholder was scored as a text query"
        assert not (set(positions.tolist()) - set(newlines.tolist())) & kept  # keep 0: every prunable token went
        for layer, chosen in request.selection.items():
            assert len(chosen[row]) == _round_half_up(PRUNED[layer], n)
            assert not set(chosen[row].tolist()) & set(newlines.tolist())


def test_several_images_in_one_prompt_are_pooled_in_order(nxt, calibration):
    model = nxt.model
    two = nxt.format_prompt(calibration.samples[2].prompt).replace("<image>", "<image><image>")
    one = nxt.format_prompt(calibration.samples[1].prompt)
    images = [load_image(calibration.samples[i]) for i in (2, 5, 0)]
    inputs = nxt.processor(images=images, text=[two, one], return_tensors="pt", padding=True)
    layout = _layout(model, inputs)
    recipe = Recipe(keep_count=np.array(PRUNED), scorer="fitprune", fingerprint=model_fingerprint(model))
    with recipe.apply(model) as handle, torch.no_grad():
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
        request = handle.last_request
    assert request.roles.n_visual_input.tolist() == [n for _, _, n in layout]
    survivors, valid = request.kept[max(request.kept)]
    for row, (_, newlines, n) in enumerate(layout):
        assert set(newlines.tolist()) <= set(survivors[row][valid[row]].tolist())
        assert len(request.selection[2][row]) == _round_half_up(200, n)


def test_missing_layout_falls_back_to_every_image_token_and_says_so_once(nxt, batch, caplog):
    adapter = family_for(nxt.model)
    with caplog.at_level(logging.INFO, logger=LOGGER_NAME):
        first = adapter.prunable_visual_tokens(nxt.model, batch["input_ids"], {})
        adapter.prunable_visual_tokens(nxt.model, batch["input_ids"], {})
    assert torch.equal(first, batch["input_ids"] == nxt.model.config.image_token_id)
    assert len([r for r in caplog.records if "newline" in r.getMessage()]) == 1


def test_recipe_compile_cli_meets_the_budget(tmp_path, capsys):
    from recipe_compiler.cli import compile_main
    from runtime import load

    out = tmp_path / "r.safetensors"
    assert compile_main(["--model", "tiny-llava-next", "--budget", "0.5", "--samples", "6", "-o", str(out), "--quiet"]) == 0
    recipe = load(out)
    assert recipe.fingerprint["model_type"] == "llava_next" and recipe.reference_visual_tokens == V_REF
    assert 0 < recipe.provenance["flops_fraction"] <= 0.5
    assert recipe.keep_count[-1] < V_REF


def test_fitprune_search_runs_on_anyres_images(nxt, calibration):
    from recipe_compiler import CompileConfig, compile_recipe
    from recipe_compiler.calibration import load_calibration

    three = load_calibration(samples=3)
    result = compile_recipe(nxt.model, nxt.processor, three, CompileConfig(budget=0.6, search="fitprune"),
                            format_prompt=nxt.format_prompt)
    assert result.verification.flops_fraction <= 0.6
    assert sorted(set(result.statistics.n_visual.tolist())) != [V_REF]  # per-image counts differ


REAL = {
    # alias: (hub id, LM config class, hidden, layers, heads, kv heads, params of the whole VLM, template start)
    "llava-v1.6-vicuna-7b": ("llava-hf/llava-v1.6-vicuna-7b-hf", "LlamaConfig", 4096, 32, 32, 32, 7.063e9, "USER: <image>\n"),
    "llava-v1.6-mistral-7b": ("llava-hf/llava-v1.6-mistral-7b-hf", "MistralConfig", 4096, 32, 32, 8, 7.567e9, "[INST] <image>\n"),
    "llava-v1.6-vicuna-13b": ("llava-hf/llava-v1.6-vicuna-13b-hf", "LlamaConfig", 5120, 40, 40, 40, 13.351e9, "USER: <image>\n"),
}


@pytest.mark.parametrize("alias", sorted(REAL))
def test_llava_16_aliases_build_the_real_architecture_and_count_2880_tokens(alias, monkeypatch, tmp_path):
    from PIL import Image
    from transformers import LlavaNextConfig

    from recipe_compiler.models import REGISTRY, load_model

    offline_hub(monkeypatch, tmp_path / "hf-cache")
    hub_id, text_class, hidden, layers, heads, kv_heads, n_params, start = REAL[alias]
    spec = REGISTRY[alias]
    config = LlavaNextConfig(**spec.config)
    t = config.text_config
    assert (spec.hub_id, type(t).__name__) == (hub_id, text_class)
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads) == (hidden, layers, heads, kv_heads)
    assert config.image_grid_pinpoints == [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    assert spec.prompt_template.startswith(start)

    lm = load_model(alias, random_weights=True, device="meta")
    assert type(lm.model).__name__ == "LlavaNextForConditionalGeneration"
    assert sum(p.numel() for p in lm.model.parameters()) == pytest.approx(n_params, rel=1e-3)
    assert model_fingerprint(lm.model)["visual_tokens"] == 2880  # 672x672: 576 base + 48x48 grid
    out = lm.processor(images=[Image.new("RGB", (672, 672)), Image.new("RGB", (500, 200))],
                       text=[lm.format_prompt("What is this?"), lm.format_prompt("Hi")], return_tensors="pt", padding=True)
    assert (out["input_ids"] == 32000).sum(dim=1).tolist()[0] == 2880 + 48
    assert out["image_sizes"].tolist() == [[672, 672], [200, 500]]
    assert out["attention_mask"][1, 0] == 0 and out["attention_mask"][:, -1].all()  # left padded


def test_recipes_do_not_cross_between_llava_and_llava_next(nxt, tiny):
    for source, target in ((tiny, nxt), (nxt, tiny)):
        recipe = Recipe.keep_all(model_fingerprint(source.model))
        with pytest.raises(RecipeMismatchError, match="model_type"):
            recipe.apply(target.model)

"""Qwen2-VL / Qwen2.5-VL: registry, processor, runtime guarantees with M-RoPE, compile end to end."""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from conftest import make_inputs
from recipe_compiler.cli import compile_main
from recipe_compiler.families import config_from_dict
from recipe_compiler.families.qwen2_vl import QWEN2_VL_PROMPT_TEMPLATE
from recipe_compiler.models import REGISTRY, build_tiny_qwen2_5_vl, build_tiny_qwen2_vl, load_model
from runtime import Recipe, RecipeMismatchError, load
from runtime.families import model_fingerprint

FAMILIES = ["qwen2_vl", "qwen2_5_vl"]
GREEDY = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
# Reference image: 256 visual tokens. Drop at three layers; other image sizes scale these counts.
PRUNED_COUNTS = [256, 256, 160, 160, 64, 64, 20, 20]


@functools.lru_cache(maxsize=None)
def _tiny(family: str, attn: str = "sdpa"):
    build = build_tiny_qwen2_vl if family == "qwen2_vl" else build_tiny_qwen2_5_vl
    return build(seed=0, attn_implementation=attn)


@pytest.fixture(scope="module")
def batch(calibration):
    """Two samples whose images differ in size (512×512 and 451×300), so token counts differ."""
    return [calibration.samples[1], calibration.samples[2]]


def _inputs(loaded, samples):
    inputs = make_inputs(loaded, samples)
    return {k: v for k, v in inputs.items()}


def _pruned(model, counts=PRUNED_COUNTS):
    return Recipe(keep_count=np.array(counts), scorer="fitprune", fingerprint=model_fingerprint(model))


def _full_positions(model, input_ids, mm_token_type_ids, grid, mask):
    """(3, B, L) M-RoPE positions of the whole unpruned sequence, as the model computes them."""
    positions, _ = model.model.get_rope_index(input_ids, mm_token_type_ids, grid, attention_mask=mask)
    return positions


# ---------------------------------------------------------------------------------- registry

REAL = {
    # alias: (hub id, model type, hidden, layers, heads, kv heads, vocab, params of the whole VLM)
    "qwen2-vl-2b": ("Qwen/Qwen2-VL-2B-Instruct", "qwen2_vl", 1536, 28, 12, 2, 151936, 2.21e9),
    "qwen2-vl-7b": ("Qwen/Qwen2-VL-7B-Instruct", "qwen2_vl", 3584, 28, 28, 4, 152064, 8.29e9),
    "qwen2.5-vl-3b": ("Qwen/Qwen2.5-VL-3B-Instruct", "qwen2_5_vl", 2048, 36, 16, 2, 151936, 3.75e9),
    "qwen2.5-vl-7b": ("Qwen/Qwen2.5-VL-7B-Instruct", "qwen2_5_vl", 3584, 28, 28, 4, 152064, 8.29e9),
}


@pytest.mark.parametrize("alias", sorted(REAL))
def test_real_alias_configs_build_the_real_architecture_with_qwen_token_ids(alias):
    hub_id, model_type, hidden, layers, heads, kv_heads, vocab, n_params = REAL[alias]
    spec = REGISTRY[alias]
    assert spec.hub_id == hub_id and spec.prompt_template == QWEN2_VL_PROMPT_TEMPLATE
    config = config_from_dict(spec.config)  # AutoConfig.for_model of the embedded config.json
    text, vision = config.text_config, config.vision_config
    assert config.model_type == model_type
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (
        hidden, layers, heads, kv_heads,
    )
    assert text.vocab_size == vocab and text.rope_parameters["mrope_section"] == [16, 24, 24]
    assert set(text.layer_types) == {"full_attention"}
    assert (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size, vision.depth) == (14, 2, 2, 32)

    lm = load_model(alias, random_weights=True, device="meta", dtype="bf16")
    assert sum(p.numel() for p in lm.model.parameters()) == pytest.approx(n_params, rel=0.005)
    assert model_fingerprint(lm.model)["visual_tokens"] == 256  # 448×448 px: (448/14/2)²
    tokens = lm.processor.tokenizer.convert_tokens_to_ids(
        ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    )
    assert tokens == [151644, 151645, config.vision_start_token_id, config.vision_end_token_id,
                      config.image_token_id, config.video_token_id]
    assert lm.processor.tokenizer.pad_token_id == 151643


def test_tiny_processor_gives_different_modest_token_counts_left_padded_with_mm_token_types(batch):
    loaded = _tiny("qwen2_vl")
    inputs = _inputs(loaded, batch)
    image = inputs["input_ids"] == loaded.model.config.image_token_id
    assert image.sum(dim=1).tolist() == [256, 247]  # 32×32 and 26×38 patches, 2×2 merged
    assert inputs["image_grid_thw"].tolist() == [[1, 32, 32], [1, 26, 38]]
    assert torch.equal(inputs["mm_token_type_ids"] == 1, image)
    assert (inputs["attention_mask"][:, 0] == 0).any() and (inputs["attention_mask"][:, -1] == 1).all()
    assert inputs["pixel_values"].dim() == 2  # Qwen's flat patches, not (B, C, H, W)
    text = loaded.processor.tokenizer.decode(inputs["input_ids"][0], skip_special_tokens=False)
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")


# ---------------------------------------------------------------------------------- runtime


@pytest.mark.parametrize("family, attn", [("qwen2_vl", "sdpa"), ("qwen2_5_vl", "sdpa"), ("qwen2_vl", "eager")])
def test_keep_all_recipe_is_bit_identical_at_prefill_and_every_decode_step(batch, family, attn):
    loaded = _tiny(family, attn)
    model = loaded.model
    inputs = _inputs(loaded, batch)
    with torch.no_grad():
        reference = model(**inputs).logits
        reference_gen = model.generate(**inputs, **GREEDY)
        with Recipe.keep_all(model_fingerprint(model)).apply(model):
            patched = model(**inputs).logits
            patched_gen = model.generate(**inputs, **GREEDY)
    assert torch.equal(patched, reference)
    assert torch.equal(patched_gen.sequences, reference_gen.sequences)
    assert len(patched_gen.logits) == 6
    for step, (a, b) in enumerate(zip(patched_gen.logits, reference_gen.logits)):
        assert torch.equal(a, b), f"decode step {step} differs"


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_cached_generation_equals_no_cache_recomputation_with_full_mrope_positions(batch, family):
    loaded = _tiny(family)
    model = loaded.model
    inputs = _inputs(loaded, batch)
    rows = inputs["input_ids"].shape[0]
    recipe = _pruned(model)
    with recipe.apply(model) as handle, torch.no_grad():
        generated = model.generate(**inputs, **GREEDY)
        request = handle.last_request
        assert request is not None, "the language model's pre-hook must see a 2D mask and prune under generate"
        selection = request.selection
        worst = 0.0
        with handle.replay(selection):
            for step in range(6):
                length = inputs["input_ids"].shape[1] + step
                ids = generated.sequences[:, :length]
                mask = torch.cat([inputs["attention_mask"], torch.ones(rows, step, dtype=torch.long)], dim=1)
                types = torch.cat([inputs["mm_token_type_ids"], torch.zeros(rows, step, dtype=torch.long)], dim=1)
                text = (mask.cumsum(-1) - 1).clamp(min=0)
                mrope = _full_positions(model, ids, types, inputs["image_grid_thw"], mask)
                logits = model(
                    input_ids=ids,
                    attention_mask=mask,
                    pixel_values=inputs["pixel_values"],
                    image_grid_thw=inputs["image_grid_thw"],
                    mm_token_type_ids=types,
                    position_ids=torch.cat([text[None], mrope], dim=0),  # (4, B, L) as generate builds them
                    use_cache=False,
                ).logits[:, -1]
                worst = max(worst, float((logits - generated.logits[step]).abs().max()))
    assert worst <= 1e-4

    # Each layer's cache: every real prompt token minus the dropped image tokens (the recipe's counts
    # scaled to each row's image), padding dropped at the first pruning layer, plus 5 fed-back tokens.
    n_visual = (inputs["input_ids"] == model.config.image_token_id).sum(dim=1).tolist()
    assert [len(kept) for kept in selection[2]] == [recipe.keep_counts_for(n)[2] for n in n_visual] == [160, 154]
    real = inputs["attention_mask"].sum(dim=1).tolist()
    cache = generated.past_key_values
    for layer in range(len(PRUNED_COUNTS)):
        length = cache.layers[layer].keys.shape[2]
        if layer < 2:
            expected = inputs["input_ids"].shape[1] + 5
        else:
            expected = max(r - n + int(recipe.keep_counts_for(n)[layer]) for r, n in zip(real, n_visual)) + 5
        assert length == expected, f"layer {layer}: cache holds {length}, recipe implies {expected}"


@pytest.mark.parametrize("family", FAMILIES)
def test_kept_tokens_keep_their_unpruned_mrope_positions_at_prefill_and_decode(batch, family):
    loaded = _tiny(family)
    model = loaded.model
    inputs = _inputs(loaded, batch)
    language_model = model.model.language_model
    seen = []

    def capture(module, args, kwargs):  # registered after the recipe's hooks: sees what layer 3 gets
        hidden = args[0] if args else kwargs["hidden_states"]
        seen.append((hidden.shape[1], kwargs["position_embeddings"], kwargs.get("position_ids")))

    with _pruned(model).apply(model) as handle, torch.no_grad():
        hook = language_model.layers[3].register_forward_pre_hook(capture, with_kwargs=True)
        try:
            generated = model.generate(**inputs, **dict(GREEDY, max_new_tokens=2))
        finally:
            hook.remove()
        selection = handle.last_request.selection[2]

    mask, types, grid = inputs["attention_mask"], inputs["mm_token_type_ids"], inputs["image_grid_thw"]
    mrope = _full_positions(model, inputs["input_ids"], types, grid, mask)
    probe = torch.zeros(1, 1, model.config.text_config.hidden_size)
    cos_full, sin_full = language_model.rotary_emb(probe, mrope)
    text_full = (mask.cumsum(-1) - 1).clamp(min=0)

    width, (cos, sin), text_positions = seen[0]
    image = inputs["input_ids"] == model.config.image_token_id
    kept = mask.bool() & ~image
    for row in range(mask.shape[0]):
        kept[row, selection[row]] = True
    assert width == int(kept.sum(dim=1).max())  # rows left re-padded to the longest
    for row in range(mask.shape[0]):
        positions = torch.nonzero(kept[row]).flatten()  # prompt positions entering layer 3, in order
        n = positions.numel()
        assert torch.equal(cos[row, -n:], cos_full[row, positions]) and torch.equal(sin[row, -n:], sin_full[row, positions])
        assert torch.equal(text_positions[row, -n:], text_full[row, positions])
        # …and they are the original, gapped positions, not a renumbering of the shorter sequence.
        assert (text_positions[row, -n:].diff() > 1).any()
        kept_visual = mrope[:, row, selection[row]]  # (t, h, w) of the kept image tokens
        assert kept_visual[1].unique().numel() > 1 and kept_visual[2].unique().numel() > 1

    # The first decode step: its rotary position is what get_rope_index gives the unpruned sequence.
    _, (cos_step, _), _ = seen[1]
    length = inputs["input_ids"].shape[1] + 1
    step_mask = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=mask.dtype)], dim=1)
    step_types = torch.cat([types, torch.zeros(mask.shape[0], 1, dtype=types.dtype)], dim=1)
    step_mrope = _full_positions(model, generated.sequences[:, :length], step_types, grid, step_mask)
    assert torch.equal(cos_step, language_model.rotary_emb(probe, step_mrope[:, :, -1:])[0])


def test_video_tokens_are_kept_while_image_tokens_are_pruned(calibration):
    loaded = _tiny("qwen2_vl")
    model, config = loaded.model, loaded.model.config
    inputs = _inputs(loaded, calibration.samples[2:3])
    # Splice a 2×8×8-patch video clip (32 tokens) after the image: the processor needs torchvision for videos.
    ids = inputs["input_ids"][0]
    end = int(torch.nonzero(ids == config.vision_end_token_id)[0]) + 1
    clip = torch.tensor([config.vision_start_token_id] + [config.video_token_id] * 32 + [config.vision_end_token_id])
    inputs["input_ids"] = torch.cat([ids[:end], clip, ids[end:]])[None]
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    types = inputs["mm_token_type_ids"][0]
    inputs["mm_token_type_ids"] = torch.cat([types[:end], 2 * (clip == config.video_token_id).long(), types[end:]])[None]
    inputs["pixel_values_videos"] = torch.randn(2 * 8 * 8, 3 * 2 * 4 * 4, generator=torch.Generator().manual_seed(0))
    inputs["video_grid_thw"] = torch.tensor([[2, 8, 8]])
    with _pruned(model).apply(model) as handle, torch.no_grad():
        generated = model.generate(**inputs, **GREEDY)
        request = handle.last_request
    total = inputs["input_ids"].shape[1]
    visual = torch.stack(request.visual_per_layer, dim=1)[0].tolist()
    tokens = torch.stack(request.tokens_per_layer, dim=1)[0].tolist()
    assert visual == [247, 247, 154, 154, 62, 62, 19, 19]  # image tokens only, scaled from 256
    assert tokens == [total - 247 + v for v in visual]  # all 32 video tokens stay in every layer
    assert generated.sequences.shape[1] == total + 6


# ---------------------------------------------------------------------------------- compile, mismatch


def test_recipe_compile_for_tiny_qwen2_vl_meets_the_budget_with_both_searches_and_applies(tmp_path, batch):
    out, fitprune, stats = tmp_path / "r.safetensors", tmp_path / "fp.safetensors", tmp_path / "stats.safetensors"
    common = ["--model", "tiny-qwen2-vl", "--budget", "0.5", "--samples", "6", "--quiet"]
    assert compile_main(common + ["-o", str(out), "--save-stats", str(stats)]) == 0
    assert compile_main(common + ["-o", str(fitprune), "--search", "fitprune", "--stats", str(stats)]) == 0
    for path in (out, fitprune):
        found = load(path)
        assert found.provenance["flops_fraction"] <= 0.5 * (1 + 1e-9)
        assert found.fingerprint["model_type"] == "qwen2_vl" and found.reference_visual_tokens == 256
        assert found.keep_count[-1] < 256
    recipe = load(out)

    loaded = _tiny("qwen2_vl")  # the CLI built the same seeded model
    assert recipe.fingerprint == model_fingerprint(loaded.model)
    with recipe.apply(loaded.model) as handle, torch.no_grad():
        loaded.model.generate(**_inputs(loaded, batch), **GREEDY)
        visual = torch.stack(handle.last_request.visual_per_layer, dim=1)
    # The default compile may choose a fixed-ratio pre-LLM stage (one view per Qwen image): the in-LLM counts then
    # scale the image's survivors.
    from runtime.prellm import stage_count

    ratio = recipe.pre_llm.get("keep_ratio")
    expected = [recipe.keep_counts_for(n if ratio is None else stage_count(ratio, n)).tolist() for n in (256, 247)]
    assert visual.tolist() == expected


def test_a_saved_qwen2_vl_directory_loads_without_torchvision_and_round_trips(tmp_path, batch):
    loaded = _tiny("qwen2_vl")
    loaded.model.save_pretrained(tmp_path)
    loaded.processor.save_pretrained(tmp_path)
    again = load_model(str(tmp_path))  # AutoProcessor alone would ask for torchvision's video processor
    assert again.format_prompt("Hi?") == loaded.format_prompt("Hi?")  # the family's template, not LLaVA's
    first, second = _inputs(loaded, batch), _inputs(again, batch)
    assert sorted(first) == sorted(second) and all(torch.equal(first[k], second[k]) for k in first)
    with torch.no_grad():
        assert torch.equal(loaded.model(**first).logits, again.model(**second).logits)


def test_a_tiny_llava_recipe_on_tiny_qwen2_vl_is_refused_naming_model_type(tiny, tmp_path):
    path = tmp_path / "llava.safetensors"
    counts = [576, 576, 300, 300, 120, 120, 40, 40]
    Recipe(keep_count=np.array(counts), scorer="fitprune", fingerprint=model_fingerprint(tiny.model)).save(path)
    model = _tiny("qwen2_vl").model
    with pytest.raises(RecipeMismatchError, match="model_type"):
        load(path).apply(model)
    assert getattr(model, "_recipe_runtime_handle", None) is None


def test_fingerprint_ignores_attention_kernel_and_separates_the_two_families():
    qwen2, qwen25 = model_fingerprint(_tiny("qwen2_vl").model), model_fingerprint(_tiny("qwen2_5_vl").model)
    assert qwen2 == model_fingerprint(_tiny("qwen2_vl", "eager").model)
    assert qwen2["model_type"] != qwen25["model_type"] and qwen2["config_hash"] != qwen25["config_hash"]


def test_tiny_qwen2_5_vl_is_a_registry_alias_and_its_builder_is_the_same_model():
    spec = REGISTRY["tiny-qwen2.5-vl"]
    assert spec.hub_id is None and spec.config["model_type"] == "qwen2_5_vl"
    by_name = load_model("tiny-qwen2.5-vl").model.state_dict()
    built = _tiny("qwen2_5_vl").model.state_dict()
    assert by_name.keys() == built.keys() and all(torch.equal(by_name[k], built[k]) for k in by_name)

"""Qwen3-VL: registry at real size, the tiny built-in, deepstack under pruning on entry to every layer, FLOPs.

The production matrix (tests/test_matrix.py) and the concurrency suite run ``tiny-qwen3-vl`` from
the family table; here is what is particular to the family: its real configs, the deepstack
features following the kept tokens (against an independent plain re-implementation of the pruned
forward), M-RoPE positions of the unpruned prompt, and FLOPs against torch's FLOP counter.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image

from recipe_compiler.families import ALIASES, config_from_dict, vision_shape
from recipe_compiler.families.qwen3_vl import QWEN3_VL_PROMPT_TEMPLATE
from recipe_compiler.flops import LMShape, encoder_flops
from recipe_compiler.models import load_model
from runtime import Recipe
from runtime.families import family_for, model_fingerprint
from runtime.prellm_stage import supported_methods, unsupported_reason

GREEDY = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)


@functools.lru_cache(maxsize=None)
def _tiny(attn: str = "sdpa"):
    return load_model("tiny-qwen3-vl", seed=0, attn_implementation=attn)


@functools.lru_cache(maxsize=None)
def _inputs(rows: int) -> dict:
    """One prompt with a 64×64 image, or two left-padded prompts with 64×64 and 88×56 images (64 and 77 tokens)."""
    from recipe_compiler.calibration import load_calibration, load_image

    loaded = _tiny()
    samples = load_calibration().samples
    images = [load_image(samples[0]).resize((64, 64), Image.BICUBIC), load_image(samples[3]).resize((88, 56), Image.BICUBIC)]
    texts = [loaded.format_prompt("What is in the picture?"), loaded.format_prompt("Count?")]
    return dict(loaded.processor(text=texts[:rows], images=images[:rows], return_tensors="pt", padding=True))


def _recipe(model, first: int, ratio: float = 0.5, **kwargs) -> Recipe:
    fp = model_fingerprint(model)
    v, layers = fp["visual_tokens"], fp["num_layers"]
    counts = np.array([v] * first + [int(ratio * v)] * (layers - first))
    return Recipe(keep_count=counts, scorer="fitprune", fingerprint=fp, **kwargs)


# ---------------------------------------------------------------------------------- registry

REAL = {
    # alias: (hub id, hidden, layers, heads, vision depth, deepstack, tied, params of the whole VLM)
    "qwen3-vl-2b": ("Qwen/Qwen3-VL-2B-Instruct", 2048, 28, 16, 24, [5, 11, 17], True, 2.13e9),
    "qwen3-vl-4b": ("Qwen/Qwen3-VL-4B-Instruct", 2560, 36, 32, 24, [5, 11, 17], True, 4.44e9),
    "qwen3-vl-8b": ("Qwen/Qwen3-VL-8B-Instruct", 4096, 36, 32, 27, [8, 16, 24], False, 8.77e9),
}


@pytest.mark.parametrize("alias", sorted(REAL))
def test_real_alias_configs_build_the_real_architecture_with_qwen_token_ids(alias):
    hub_id, hidden, layers, heads, depth, deepstack, tied, n_params = REAL[alias]
    spec = ALIASES[alias]
    assert spec.hub_id == hub_id and spec.prompt_template == QWEN3_VL_PROMPT_TEMPLATE
    config = config_from_dict(spec.config)
    text, vision = config.text_config, config.vision_config
    assert (config.model_type, text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == ("qwen3_vl", hidden, layers, heads)
    assert (text.num_key_value_heads, text.head_dim, text.vocab_size, config.tie_word_embeddings) == (8, 128, 151936, tied)
    assert text.rope_parameters["mrope_section"] == [24, 20, 20] and text.rope_parameters["mrope_interleaved"]
    assert (vision.depth, vision.patch_size, vision.deepstack_visual_indexes, vision.out_hidden_size) == (depth, 16, deepstack, hidden)

    lm = load_model(alias, random_weights=True, device="meta", dtype="bf16")
    assert sum(p.numel() for p in lm.model.parameters()) == pytest.approx(n_params, rel=0.005)
    assert model_fingerprint(lm.model)["visual_tokens"] == 256  # 512×512 px: (512/16/2)²
    tokens = lm.processor.tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"])
    assert tokens == [151644, 151645, 151652, 151653, config.image_token_id]
    processor = lm.processor.image_processor
    assert (processor.patch_size, processor.merge_size, list(processor.image_mean)) == (16, 2, [0.5, 0.5, 0.5])
    inputs = lm.processor(text=[lm.format_prompt("Hi?")], images=[Image.new("RGB", (512, 512))], return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 32, 32]]  # the reference image: 256 tokens
    assert int((inputs["input_ids"] == config.image_token_id).sum()) == 256


def test_the_tiny_built_in_loads_by_name_with_the_real_layout_and_deepstack_layers():
    loaded = load_model("tiny-qwen3-vl")
    model = loaded.model
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration" and ALIASES["tiny-qwen3-vl"].hub_id is None
    assert len(model.model.visual.deepstack_merger_list) == 3 == len(model.model.language_model.layers) - 5
    assert torch.equal(next(iter(model.state_dict().values())), next(iter(_tiny().model.state_dict().values())))
    assert loaded.format_prompt("Hi?") == QWEN3_VL_PROMPT_TEMPLATE.format(prompt="Hi?")
    assert model_fingerprint(model)["model_type"] == "qwen3_vl"
    assert model_fingerprint(model) != model_fingerprint(load_model("tiny-qwen2-vl").model)


def test_stages_the_family_runs_and_those_it_refuses_with_the_reason():
    model = _tiny().model
    from runtime.methods.stages import STAGES

    assert {"g-prune", "fopru-rank", "fopru-row"} <= set(supported_methods(model))
    for name, stage in STAGES.items():  # every stage runs but those reading the CLS token ("features")
        reason = unsupported_reason(model, name)
        assert (reason is None) == ("features" not in stage.signals), name
        assert reason is None or "its vision encoder has no CLS token" in reason


def test_the_vllm_plugin_refuses_qwen3_vl_recipes_with_the_family_reason(tmp_path):
    import runtime.vllm as plugin
    from runtime import RecipeError

    recipe = _recipe(_tiny().model, 8, pre_llm={"method": "g-prune", "keep_ratio": 0.5, "params": {}})
    with pytest.raises(RecipeError, match="Qwen3-VL is not served by the vLLM plugin yet.*deepstack"):
        plugin.overrides(recipe.save(tmp_path / "r.safetensors"))


# ---------------------------------------------------------------------------------- deepstack


def _plain_pruned_logits(model, inputs: dict, layer: int, kept: torch.Tensor) -> torch.Tensor:
    """An independent plain forward of one unpadded prompt that drops all image tokens but ``kept``
    on entry to ``layer``: deepstack features added to the kept image tokens only, (cos, sin) of
    the unpruned ``get_rope_index`` positions. Returns the last position's logits."""
    base, lm = model.model, model.model.language_model
    ids = inputs["input_ids"]
    encoded = base.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
    image = ids[0] == model.config.image_token_id
    hidden = lm.embed_tokens(ids).clone()
    hidden[0, image] = torch.cat(encoded.pooler_output)
    deepstack = [torch.cat(f) for f in encoded.deepstack_features]
    positions, _ = base.get_rope_index(ids, inputs["mm_token_type_ids"], inputs["image_grid_thw"])
    cos, sin = lm.rotary_emb(hidden, positions)
    text_positions = torch.arange(ids.shape[1])[None]
    visual = image
    for index, decoder_layer in enumerate(lm.layers):
        if index == layer:
            keep = ~image
            keep[kept] = True
            rows = keep[image]  # which image tokens' deepstack rows stay
            hidden, cos, sin, text_positions = hidden[:, keep], cos[:, keep], sin[:, keep], text_positions[:, keep]
            deepstack = [d[rows] for d in deepstack]
            visual = visual[keep]
        hidden = decoder_layer(hidden, attention_mask=None, position_ids=text_positions, past_key_values=None,
                               position_embeddings=(cos, sin))
        if index < len(deepstack):
            hidden = hidden.clone()
            hidden[0, visual] = hidden[0, visual] + deepstack[index]
    return model.lm_head(lm.norm(hidden))[:, -1]


@pytest.mark.parametrize("layer", range(1, 8))
def test_pruning_on_entry_to_any_layer_adds_deepstack_features_to_the_kept_tokens(layer):
    model = _tiny().model
    inputs = _inputs(1)
    with _recipe(model, layer).apply(model) as handle, torch.no_grad():
        logits = model(**inputs).logits[:, -1]
        kept = handle.last_request.selection[layer][0]
    assert kept.numel() == 32  # half the 64 image tokens of a 64×64 image
    with torch.no_grad():
        plain = _plain_pruned_logits(model, inputs, layer, kept)
    assert float((logits - plain).abs().max()) <= 1e-5


@pytest.mark.parametrize("layer", [1, 2, 3, 5])
def test_generate_batch_2_two_image_sizes_pruned_at_a_deepstack_layer_matches_recomputation(layer):
    model = _tiny().model
    inputs = _inputs(2)
    with _recipe(model, layer).apply(model) as handle, torch.no_grad():
        out = model.generate(**inputs, **GREEDY)
        request = handle.last_request
        assert torch.stack(request.visual_per_layer, 1)[:, layer:].unique(dim=1).flatten().tolist() == [32, 39]
        steps = out.sequences.shape[1] - inputs["input_ids"].shape[1]
        sequences = out.sequences[:, :-1]
        grow = torch.ones(2, steps - 1, dtype=inputs["attention_mask"].dtype)
        kwargs = dict(inputs, input_ids=sequences, attention_mask=torch.cat([inputs["attention_mask"], grow], 1),
                      mm_token_type_ids=torch.cat([inputs["mm_token_type_ids"], 0 * grow], 1))
        kwargs["position_ids"] = model._prepare_position_ids_for_generation(sequences, dict(kwargs))
        with handle.replay(request.selection):
            recomputed = model(**kwargs, use_cache=False).logits[:, -steps:]
    for step in range(steps):
        assert float((recomputed[:, step] - out.logits[step]).abs().max()) <= 1e-4


def test_without_the_family_hook_pruning_on_entry_to_layer_1_breaks_as_measured(monkeypatch):
    """The negative control: the deepstack mask of the unpruned prompt meets the shorter hidden states."""
    from runtime.families.base import Family
    from runtime.families.qwen3_vl import Qwen3VLFamily

    model = _tiny().model
    monkeypatch.setattr(Qwen3VLFamily, "pruning_hooks", Family.pruning_hooks)
    with _recipe(model, 1).apply(model), torch.no_grad(), pytest.raises(IndexError, match="mask"):
        model(**_inputs(1))


def test_kept_tokens_keep_the_unpruned_get_rope_index_positions_batch_2():
    model = _tiny().model
    inputs = _inputs(2)
    lm = model.model.language_model
    seen = []

    def capture(module, args, kwargs):  # registered after the recipe's hooks: sees what layer 2 gets
        seen.append(kwargs["position_embeddings"])

    with _recipe(model, 1).apply(model) as handle, torch.no_grad():
        hook = lm.layers[2].register_forward_pre_hook(capture, with_kwargs=True)
        try:
            model(**inputs)
        finally:
            hook.remove()
        index, valid = handle.last_request.kept[1]
    mask = inputs["attention_mask"]
    positions, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"], attention_mask=mask)
    cos_full, sin_full = lm.rotary_emb(torch.zeros(1, 1, 1), positions)
    cos, sin = seen[0]
    for row in range(2):
        slots = valid[row]
        assert torch.equal(cos[row, slots], cos_full[row, index[row, slots]])
        assert torch.equal(sin[row, slots], sin_full[row, index[row, slots]])
        kept_image = index[row, slots][inputs["input_ids"][row, index[row, slots]] == model.config.image_token_id]
        assert positions[1:, row, kept_image].unique(dim=1).shape[1] == kept_image.numel()  # distinct (h, w)


# ---------------------------------------------------------------------------------- FLOPs


def test_vision_flops_with_deepstack_mergers_equal_torch_flop_counter_on_the_tiny_model():
    from torch.utils.flop_counter import FlopCounterMode

    model = _tiny("eager").model
    grids = torch.tensor([[1, 12, 20], [1, 8, 8]])
    torch.manual_seed(0)
    pixels = torch.randn(int(grids.prod(dim=1).sum()), 96)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.model.get_image_features(pixels, grids)
    shape = vision_shape(model.config)
    assert len(shape.projector) == 2 * 4  # the merger and three deepstack mergers
    assert encoder_flops(shape, grids=grids.tolist()) == counter.get_total_flops()


def test_language_model_linear_flops_equal_torch_flop_counter_on_the_tiny_model():
    """q/k/v/o (head_dim 24 ≠ hidden / heads) and the gated MLP of every layer: the formula's linear term."""
    from torch.utils.flop_counter import FlopCounterMode

    model = _tiny().model
    lm = model.model.language_model
    n = 37
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        lm(inputs_embeds=torch.randn(1, n, lm.config.hidden_size), use_cache=False)
    counts = counter.get_flop_counts()
    linear = sum(flops for name, ops in counts.items() if name.rsplit(".", 2)[-2:-1] == ["layers"]
                 for op, flops in ops.items() if str(op).split(".")[1] in ("mm", "addmm"))
    shape = LMShape.from_config(family_for(model).text_config(model))
    assert shape.head_dim == 24 and linear == 2 * n * shape.projection_macs_per_token * shape.num_layers


# ---------------------------------------------------------------------------------- compile


@pytest.mark.parametrize("options", [[], ["--search", "fitprune"], ["--pre-llm", "auto"]], ids=["optimal", "fitprune", "pre-llm-auto"])
def test_recipe_compile_for_tiny_qwen3_vl_meets_the_budget_applies_and_inspects(tmp_path, capsys, options):
    from recipe_compiler.cli import compile_main, inspect_main
    from runtime import load

    out = tmp_path / "r.safetensors"
    assert compile_main(["--model", "tiny-qwen3-vl", "--samples", "3", "--quiet", "--budget", "0.45", *options, "-o", str(out)]) == 0
    stdout = capsys.readouterr().out
    if "auto" in options:
        skipped = [line for line in stdout.splitlines() if "skipped" in line]
        assert skipped and all("on model_type 'qwen3_vl' (its vision encoder has no CLS token)" in line for line in skipped)
        assert any(line.startswith("-cls-inflection ") for line in skipped)
        assert not any(line.startswith(f"-{method} ") for line in skipped for method in ("g-prune", "fopru-rank", "fopru-row"))
    recipe = load(out)
    assert recipe.fingerprint == model_fingerprint(_tiny().model)
    assert recipe.provenance["flops_fraction"] <= 0.45 * (1 + 1e-9)
    model = _tiny().model
    with recipe.apply(model) as handle, torch.no_grad():
        model.generate(**_inputs(2), **GREEDY)
        assert handle.last_request is not None
    assert inspect_main([str(out)]) == 0
    assert "per reference image (tiny-qwen3-vl" in capsys.readouterr().out


def test_a_deep_copy_of_a_patched_model_is_clean_and_prunes_on_its_own_handle():
    import copy

    model = _tiny().model
    inputs = _inputs(1)
    with torch.no_grad():
        reference = model(**inputs).logits
    with _recipe(model, 1).apply(model) as handle, torch.no_grad():
        clone = copy.deepcopy(model)
        assert "_deepstack_process" not in clone.model.language_model.__dict__  # the family's wrapper stays behind
        assert torch.equal(clone(**inputs).logits, reference)
        pruned = model(**inputs).logits
        with _recipe(clone, 1).apply(clone) as other:
            assert torch.equal(clone(**inputs).logits, pruned)
            assert other.last_request.selection[1][0].tolist() == handle.last_request.selection[1][0].tolist()
    assert "_deepstack_process" not in model.model.language_model.__dict__  # removed with the handle

"""Vision-encoder (+ projector) FLOPs per family, reported beside the language-model figures.

Checked three ways: against the formula written out by hand for tiny shapes, against torch's own
FLOP counter on the real tiny models of every family (eager attention, so the attention matmuls
are counted too), and against OpenCLIP's published figure for CLIP ViT-L/14-336.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from recipe_compiler.flops import VisionShape, encoder_flops, format_flops, reference_encoder_flops
from recipe_compiler.families import config_from_dict, vision_shape
from recipe_compiler.models import REGISTRY


def _shape(alias: str) -> VisionShape:
    return vision_shape(config_from_dict(REGISTRY[alias].config))


# --------------------------------------------------------------------------------- by hand
# w = width, m = MLP width, n = tokens of one attention sequence; per layer (multiply-adds):
# 4·n·w² projections + 2·n²·w attention + (2 or 3)·n·w·m MLP; ×2 FLOPs per multiply-add.
CLIP_TINY = VisionShape("crops", 2, 4, 8, False, 12, ((4, 6), (6, 6)), tokens_per_crop=5, projected_per_crop=4)
QWEN_TINY = VisionShape("grids", 1, 4, 8, False, 24, ((16, 16), (16, 5)), merge=2)
QWEN25_TINY = VisionShape("grids", 2, 4, 6, True, 24, ((16, 16), (16, 5)), merge=2, window=2, full_attention_layers=(1,))


def _layer(n_tokens, sequences, w, m, gated=False):
    return n_tokens * 4 * w * w + sum(2 * s * s * w for s in sequences) + n_tokens * (3 if gated else 2) * w * m


@pytest.mark.parametrize("shape, units, macs", [
    # one crop: 4 patches · 12 inputs · 4 + 2 layers on 5 tokens + projector on 4 tokens (4·6 + 6·6)
    (CLIP_TINY, dict(crops=1), 4 * 12 * 4 + 2 * _layer(5, [5], 4, 8) + 4 * (24 + 36)),
    # the encoder runs once per crop (LLaVA-NeXT: base + grid crops)
    (CLIP_TINY, dict(crops=5), 5 * (4 * 12 * 4 + 2 * _layer(5, [5], 4, 8) + 4 * (24 + 36))),
    (CLIP_TINY, dict(crops=0), 0),
    # Qwen2-VL, one 4×6-patch image: 24 patches attend together; the merger maps 24 / 2² = 6 tokens
    (QWEN_TINY, dict(grids=[(1, 4, 6)]), 24 * 24 * 4 + _layer(24, [24], 4, 8) + 6 * (256 + 80)),
    # a 2-frame video attends per frame; two images add up
    (QWEN_TINY, dict(grids=[(2, 4, 6)]), 48 * 24 * 4 + _layer(48, [24, 24], 4, 8) + 12 * (256 + 80)),
    (QWEN_TINY, dict(grids=[(1, 4, 6), (1, 2, 2)]),
     24 * 24 * 4 + _layer(24, [24], 4, 8) + 6 * 336 + 4 * 24 * 4 + _layer(4, [4], 4, 8) + 1 * 336),
    # Qwen2.5-VL, 6×10 patches = 3×5 merged tokens in windows of 2×2 merged: rows [2, 1] × cols
    # [2, 2, 1] → windows of 4, 4, 2, 2, 2, 1 merged tokens (×4 patches); layer 0 windowed,
    # layer 1 full; gated MLP.
    (QWEN25_TINY, dict(grids=[(1, 6, 10)]),
     60 * 24 * 4 + _layer(60, [16, 16, 8, 8, 8, 4], 4, 6, gated=True) + _layer(60, [60], 4, 6, gated=True) + 15 * (256 + 80)),
])
def test_encoder_flops_match_the_formula_written_out(shape, units, macs):
    assert encoder_flops(shape, **units) == 2.0 * macs


def test_bad_inputs_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="multiples of the merge size"):
        encoder_flops(QWEN_TINY, grids=[(1, 3, 4)])
    with pytest.raises(ValueError, match="non-negative"):
        encoder_flops(CLIP_TINY, crops=-1)
    with pytest.raises(ValueError, match="kind"):
        VisionShape("siglip", 1, 1, 1, False, 1, ())
    with pytest.raises(ValueError, match="not 'mllama'"):
        vision_shape(type("C", (), {"model_type": "mllama", "vision_config": object()})())


# -------------------------------------------------------------------- a published figure
def test_clip_vit_l14_336_matches_openclip_published_gflops():
    """OpenCLIP's docs/model_profile.csv lists ViT-L-14-336 at image_gflops 381.92 (measured with
    torch.utils.flop_counter, 2 FLOPs per multiply-add, one 336-px image). Its tower adds only a
    1024→768 projection of the pooled token (~1.6 MFLOPs) to the HF CLIPVisionModel LLaVA runs."""
    encoder = dataclasses.replace(_shape("llava-1.5-7b"), projector=())
    flops = encoder_flops(encoder, crops=1)
    assert flops == pytest.approx(381.92e9, rel=1e-3)
    # and the 2·params·tokens rule of thumb (304 M parameters, 577 tokens) plus attention
    assert 2 * 304e6 * 577 < flops < 2 * 304e6 * 577 + 2 * 2 * 24 * 577**2 * 1024 * 1.01


@pytest.mark.parametrize("alias, crops", [("llava-1.5-7b", 1), ("llava-v1.6-vicuna-7b", 5), ("tiny-llava-next", 5)])
def test_reference_image_runs_the_families_crop_count(alias, crops):
    shape = _shape(alias)
    assert shape.reference_crops == crops
    v_ref = 576 if alias == "llava-1.5-7b" else 2880 if "vicuna" in alias else 320
    assert reference_encoder_flops(shape, v_ref) == crops * encoder_flops(shape, crops=1)


def test_llava_projector_is_the_two_layer_mlp_on_every_patch_token():
    shape = _shape("llava-1.5-7b")
    assert shape.projector == ((1024, 4096), (4096, 4096)) and shape.projected_per_crop == 576
    no_projector = encoder_flops(dataclasses.replace(shape, projector=()), crops=1)
    assert encoder_flops(shape, crops=1) - no_projector == 2.0 * 576 * (1024 * 4096 + 4096 * 4096)


@pytest.mark.parametrize("value, text", [(3.8192e11, "381.9 GFLOPs"), (2.5e6, "2.50 MFLOPs"), (1.234e12, "1.23 TFLOPs"), (12, "12 FLOPs")])
def test_format_flops(value, text):
    assert format_flops(value) == text


# ------------------------------------------------------------- against torch's FLOP counter
def _measured_and_ours(loaded, kwargs):
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        loaded.model.model.get_image_features(**kwargs)
    shape = vision_shape(loaded.model.config)
    if "image_grid_thw" in kwargs:
        return counter.get_total_flops(), encoder_flops(shape, grids=kwargs["image_grid_thw"].tolist())
    if "image_sizes" in kwargs:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        config = loaded.model.config
        crops = sum(image_size_to_num_patches(s, config.image_grid_pinpoints, config.vision_config.image_size)
                    for s in kwargs["image_sizes"].tolist())
        return counter.get_total_flops(), encoder_flops(shape, crops=crops)
    return counter.get_total_flops(), encoder_flops(shape, crops=kwargs["pixel_values"].shape[0])


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl"])
def test_formula_equals_torch_flop_counter_on_the_tiny_models(family):
    from recipe_compiler.models import build_random, load_model

    torch.manual_seed(0)
    if family == "llava":
        loaded = load_model("tiny-llava", attn_implementation="eager")
        kwargs = {"pixel_values": torch.randn(2, 3, 96, 96)}
    elif family == "llava_next":  # a wide image (base + 3 crops) and a square one (base + 4)
        loaded = load_model("tiny-llava-next", attn_implementation="eager")
        kwargs = {"pixel_values": torch.randn(2, 5, 3, 32, 32), "image_sizes": torch.tensor([[32, 96], [64, 64]])}
    else:  # tiny Qwen2.5-VL windows are 4×4 merged tokens: 12×20 patches = 6×10 merged leave partial windows
        loaded = (load_model("tiny-qwen2-vl", attn_implementation="eager") if family == "qwen2_vl"
                  else build_random(REGISTRY["tiny-qwen2.5-vl"], attn_implementation="eager"))
        grids = torch.tensor([[1, 12, 20], [1, 8, 8]])
        kwargs = {"pixel_values": torch.randn(int(grids.prod(dim=1).sum()), 96), "image_grid_thw": grids}
    measured, ours = _measured_and_ours(loaded, kwargs)
    assert measured > 0 and ours == pytest.approx(measured, rel=1e-12)


# ---------------------------------------------------------------- reported on a real compile
def test_compile_summary_reports_the_encoder_share_on_tiny_llava(tmp_path, capsys):
    from recipe_compiler.cli import compile_main

    out = tmp_path / "r.safetensors"
    assert compile_main(["--model", "tiny-llava", "--samples", "2", "--quiet", "--budget", "0.5", "-o", str(out)]) == 0
    [line] = capsys.readouterr().out.strip().splitlines()
    parts = line.split(" | ")
    assert parts[0] == "budget 0.5" and parts[1].startswith("flops ")  # the first fields keep their places
    assert float(parts[1].split()[1]) <= 0.5 * (1 + 1e-9)
    per_image = encoder_flops(_shape("tiny-llava"), crops=1)  # every calibration sample holds one image
    assert f"vision encoder {format_flops(per_image)}/sample" in line
    share = float(line.split("/sample (")[1].split("%")[0])
    assert 0 < share < 100
    assert 0 <= float(line.split("visual-only flops ")[1].split(" ")[0]) < 1


def test_recipe_eval_reports_encoder_and_fractions(tiny):
    from recipe_compiler.calibration import load_calibration
    from recipe_compiler.evaluate import evaluate_recipes, format_table
    from runtime import Recipe
    from runtime.families import model_fingerprint

    samples = load_calibration(split="heldout", samples=2)
    fp = model_fingerprint(tiny.model)
    recipes = {"keep": Recipe.keep_all(fp), "cut": Recipe(keep_count=np.array([576, 576, 144, 144, 72, 72, 0, 0]), scorer="fitprune", fingerprint=fp)}
    keep, cut = evaluate_recipes(tiny.model, tiny.processor, samples, recipes, format_prompt=tiny.format_prompt, new_tokens=1, repeats=1)
    per_image = encoder_flops(_shape("tiny-llava"), crops=1)
    for r in (keep, cut):
        assert r.vision_flops == per_image
        assert r.vision_share == pytest.approx(per_image / (per_image + r.unpruned_flops))
    assert keep.end_to_end_fraction == 1.0 and keep.visual_token_fraction == 1.0
    # the encoder is not pruned: the whole-prefill fraction lies between the LM fraction and 1
    assert cut.flops_fraction < cut.end_to_end_fraction < 1.0
    assert 0 < cut.visual_token_fraction < cut.flops_fraction
    assert json.loads(json.dumps(dataclasses.asdict(cut)))["vision_flops"] == per_image
    table = format_table([keep, cut])
    assert "vis.only" in table.splitlines()[0] and format_flops(per_image) in table


# ------------------------------------------------------------------------- recipe-inspect
def test_inspect_shows_the_encoder_for_a_registry_fingerprint_and_skips_it_otherwise(tiny, tmp_path, capsys):
    from recipe_compiler.cli import inspect_main
    from runtime import Recipe
    from runtime.families import model_fingerprint

    fp = model_fingerprint(tiny.model)
    known, unknown = tmp_path / "known.safetensors", tmp_path / "unknown.safetensors"
    Recipe.keep_all(fp).save(known)
    Recipe.keep_all({**fp, "config_hash": "0" * 16}).save(unknown)
    assert inspect_main([str(known)]) == 0
    text = capsys.readouterr().out
    assert f"encoder + projector {format_flops(encoder_flops(_shape('tiny-llava'), crops=1))} per reference image (tiny-llava" in text
    assert inspect_main([str(known), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["vision_encoder"]["model"] == "tiny-llava"
    assert inspect_main([str(unknown)]) == 0
    text = capsys.readouterr().out
    assert "vision " not in text and "layer  keep  ratio" in text


@pytest.mark.parametrize("alias", ["tiny-llava-next", "tiny-qwen2-vl"])
def test_verification_matches_each_batched_image_to_its_prompt(alias):
    """Batched prompts (padded, images of different sizes) get the same encoder FLOPs as one by one."""
    from recipe_compiler.calibration import load_calibration
    from recipe_compiler.collect import model_inputs
    from recipe_compiler.flops import LMShape
    from recipe_compiler.models import load_model
    from recipe_compiler.verify import verify_recipe
    from runtime import Recipe
    from runtime.families import family_for, model_fingerprint
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    loaded = load_model(alias)
    model, config = loaded.model, loaded.model.config
    samples = load_calibration(samples=3)
    shape = vision_shape(config)
    alone = []
    for sample in samples.samples:
        inputs = model_inputs(model, loaded.processor, [sample], loaded.format_prompt)
        if "image_grid_thw" in inputs:
            alone.append(encoder_flops(shape, grids=inputs["image_grid_thw"].tolist()))
        else:
            size = inputs["image_sizes"][0].tolist()
            alone.append(encoder_flops(shape, crops=image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)))
    v = verify_recipe(model, loaded.processor, samples, Recipe.keep_all(model_fingerprint(model)),
                      LMShape.from_config(family_for(model).text_config(model)), format_prompt=loaded.format_prompt, batch_size=2)
    assert v.vision_flops == pytest.approx(float(np.mean(alone)), rel=1e-12)
    assert v.end_to_end_fraction == 1.0 and v.visual_token_fraction == 1.0


@pytest.mark.parametrize("alias, image_size", [("llava-1.5-7b", None), ("llava-v1.6-mistral-7b", (400, 700))])
def test_formula_equals_torch_flop_counter_at_real_size_on_the_meta_device(alias, image_size):
    """The real architectures, built without weights: shapes alone decide the count."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    from recipe_compiler.models import _random_model

    config = config_from_dict(REGISTRY[alias].config)
    model = _random_model(config, device="meta", dtype=torch.float16, attn_implementation="eager", seed=0)
    if image_size is None:
        kwargs, crops = {"pixel_values": torch.empty(1, 3, 336, 336, device="meta", dtype=torch.float16)}, 1
    else:  # a 400×700 image (its best pinpoint is 672×672 here: base + 2×2 crops)
        crops = image_size_to_num_patches(list(image_size), config.image_grid_pinpoints, 336)
        kwargs = {"pixel_values": torch.empty(1, 5, 3, 336, 336, device="meta", dtype=torch.float16),
                  "image_sizes": torch.tensor([list(image_size)])}
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.model.get_image_features(**kwargs)
    assert encoder_flops(vision_shape(config), crops=crops) == pytest.approx(counter.get_total_flops(), rel=1e-12)

"""Qwen2.5-VL in full: FoPru reads each patch's attention in image order, though the encoder runs in window order.

The reference is independent of the family's un-permutation: the eager vision blocks' attention
probabilities are recorded as they run (window order), and the permutation is read off the
encoder itself by matching the rows entering block 0 with the patch embeddings (image order) of
random patches (distinct rows) on the same grids.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image

from recipe_compiler.models import load_model
from runtime import Recipe
from runtime import prellm
from runtime.families import model_fingerprint
from runtime.prellm import stage_count
from runtime.prellm_stage import supported_methods, unsupported_reason

GREEDY = dict(max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)


@functools.lru_cache(maxsize=None)
def _tiny():
    return load_model("tiny-qwen2.5-vl", seed=0, attn_implementation="eager")


@functools.lru_cache(maxsize=None)
def _inputs() -> dict:
    """Two left-padded prompts with a 64×64 and an 88×56 image (16×16 and 14×22 patches: partial 4×4-token windows)."""
    from recipe_compiler.calibration import load_calibration, load_image

    loaded = _tiny()
    samples = load_calibration().samples
    images = [load_image(samples[0]).resize((64, 64), Image.BICUBIC), load_image(samples[3]).resize((88, 56), Image.BICUBIC)]
    texts = [loaded.format_prompt("What is in the picture?"), loaded.format_prompt("Count?")]
    return dict(loaded.processor(text=texts, images=images, return_tensors="pt", padding=True))


def _reference(model, inputs: dict, block: int, monkeypatch) -> list[torch.Tensor]:
    """Per image: each merged token's significance at vision ``block`` (attention received, mean over
    heads and the queries of its attention chunk, mean over the 2×2 merge group), in image order."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl

    visual = model.model.visual
    target = visual.blocks[block].attn
    recorded, embedded, entering = [], [], []
    original = modeling_qwen2_5_vl.eager_attention_forward

    def recording(module, *args, **kwargs):
        output, weights = original(module, *args, **kwargs)
        if module is target:
            recorded.append(weights[0].mean(dim=(0, 1)))  # one attention chunk (an image or a window)
        return output, weights

    monkeypatch.setattr(modeling_qwen2_5_vl, "eager_attention_forward", recording)
    hooks = [visual.patch_embed.register_forward_hook(lambda module, args, out: embedded.append(out)),
             visual.blocks[0].register_forward_pre_hook(lambda module, args, kwargs: entering.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)]
    try:
        with torch.no_grad():
            model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
            del embedded[:], entering[:]  # the order depends on the grids alone: read it off distinct random patches
            generator = torch.Generator().manual_seed(0)
            model.model.get_image_features(torch.randn(inputs["pixel_values"].shape, generator=generator),
                                           inputs["image_grid_thw"], return_dict=True)
    finally:
        for hook in hooks:
            hook.remove()
        monkeypatch.setattr(modeling_qwen2_5_vl, "eager_attention_forward", original)
    window_order = torch.cat(recorded[: len(recorded) // 2])
    matches = (entering[0][:, None, :] == embedded[0][None, :, :]).all(dim=-1)  # entering row j is patch source[j]
    assert bool((matches.sum(dim=1) == 1).all())
    source = matches.float().argmax(dim=1)
    assert not torch.equal(source, torch.arange(source.numel()))  # the encoder really reorders
    image_order = torch.empty_like(window_order)
    image_order[source] = window_order
    merge = model.config.vision_config.spatial_merge_size
    sizes = inputs["image_grid_thw"].prod(dim=1).tolist()
    return [chunk.float().view(-1, merge * merge).mean(dim=1) for chunk in torch.split(image_order, sizes)]


def test_every_stage_but_those_reading_a_cls_token_is_supported_and_those_say_why():
    model = _tiny().model
    from runtime.methods.stages import STAGES

    assert {"g-prune", "fopru-rank", "fopru-row"} <= set(supported_methods(model))
    for name, stage in STAGES.items():  # every stage runs but those reading the CLS token ("features")
        reason = unsupported_reason(model, name)
        assert (reason is None) == ("features" not in stage.signals), name
        assert reason is None or "its vision encoder has no CLS token" in reason


@pytest.mark.parametrize("feature_layer", [2, 1], ids=["full-attention-block", "windowed-block"])
@pytest.mark.parametrize("method", ["fopru-rank", "fopru-row"])
def test_fopru_keeps_the_reference_tokens_in_image_order_under_generate_with_batch_2(method, feature_layer, monkeypatch):
    model = _tiny().model
    inputs = _inputs()
    fp = model_fingerprint(model)
    recipe = Recipe(keep_count=np.full(fp["num_layers"], fp["visual_tokens"]), scorer="fitprune", fingerprint=fp,
                    pre_llm={"method": method, "keep_ratio": 0.5, "params": {"feature_layer": feature_layer}})
    with recipe.apply(model) as handle, torch.no_grad():
        out = model.generate(**inputs, **GREEDY)
        request = handle.last_request
    assert all(torch.isfinite(step).all() for step in out.logits)
    reference = _reference(model, inputs, feature_layer - 1, monkeypatch)
    grids = [(h // 2, w // 2) for _, h, w in inputs["image_grid_thw"].tolist()]
    for row, (significance, grid) in enumerate(zip(reference, grids)):
        positions = torch.nonzero(inputs["input_ids"][row] == model.config.image_token_id).flatten()
        assert positions.numel() == significance.numel() == grid[0] * grid[1]
        k = stage_count(0.5, positions.numel())
        mask = prellm.fopru_rank_keep(significance, k) if method == "fopru-rank" else prellm.fopru_row_keep(significance, grid, k)
        assert torch.equal(request.selection[0][row], positions[mask])
    assert request.visual_per_layer[0].tolist() == [stage_count(0.5, s.numel()) for s in reference] == [32, 39]


def test_without_undoing_the_windows_the_selection_would_differ(monkeypatch):
    """The negative control: the window-order signal read as if in image order picks other tokens."""
    import runtime.families.qwen2_5_vl as family

    model = _tiny().model
    inputs = _inputs()
    fp = model_fingerprint(model)
    recipe = Recipe(keep_count=np.full(fp["num_layers"], fp["visual_tokens"]), scorer="fitprune", fingerprint=fp,
                    pre_llm={"method": "fopru-rank", "keep_ratio": 0.5, "params": {}})

    def kept():
        with recipe.apply(model) as handle, torch.no_grad():
            model(**inputs)
            return handle.last_request.selection[0]

    right = kept()
    monkeypatch.setattr(family, "patch_order", lambda model, values, grids: values)
    wrong = kept()
    assert any(not torch.equal(a, b) for a, b in zip(right, wrong))


def test_pre_llm_auto_evaluates_fopru_and_skips_only_the_stages_that_need_a_cls_token(tmp_path, capsys):
    from recipe_compiler.cli import compile_main
    from runtime import load

    out = tmp_path / "r.safetensors"
    code = compile_main(["--model", "tiny-qwen2.5-vl", "--samples", "3", "--quiet", "--budget", "0.4", "--pre-llm", "auto", "-o", str(out)])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    lines = stdout.strip().splitlines()
    skipped = [line for line in lines if "skipped" in line]
    assert skipped and all("on model_type 'qwen2_5_vl' (its vision encoder has no CLS token)" in line for line in skipped)
    assert any(line.startswith("-cls-inflection ") for line in skipped)
    for method in ("none", "g-prune", "fopru-rank", "fopru-row"):
        assert any(line[1:].startswith(method + " ") for line in lines[1:-1])
    assert load(out).provenance["flops_fraction"] <= 0.4 * (1 + 1e-9)

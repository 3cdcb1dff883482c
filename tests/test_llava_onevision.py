"""LLaVA-OneVision: the real aliases' architecture, anyres_max_9 geometry (bilinear downscaling,
multi-image prompts), the SigLIP attention signal, and cls-inflection refused (no CLS) at compile and apply."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from recipe_compiler.models import load_model
from runtime import Recipe, RecipeMismatchError
from runtime.families import family_for, model_fingerprint
from runtime.families.llava_onevision import packed_layout

REAL = {
    # alias: (hub id, hidden, layers, heads, kv heads, parameters of the whole VLM)
    "llava-onevision-qwen2-0.5b-ov": ("llava-hf/llava-onevision-qwen2-0.5b-ov-hf", 896, 24, 14, 2, 0.894e9),
    "llava-onevision-qwen2-7b-ov": ("llava-hf/llava-onevision-qwen2-7b-ov-hf", 3584, 28, 28, 4, 8.03e9),
}


@pytest.fixture(scope="module")
def ov():
    return load_model("tiny-llava-onevision")


@pytest.mark.parametrize("alias", sorted(REAL))
def test_real_aliases_build_the_real_architecture_on_the_meta_device(alias):
    hub_id, hidden, layers, heads, kv, n_params = REAL[alias]
    lm = load_model(alias, random_weights=True, device="meta", dtype="bf16")
    assert lm.spec.hub_id == hub_id and type(lm.model).__name__ == "LlavaOnevisionForConditionalGeneration"
    text = lm.model.config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (hidden, layers, heads, kv)
    assert sum(p.numel() for p in lm.model.parameters()) == pytest.approx(n_params, rel=0.01)
    # the reference image is the largest pinpoint, 2304×2304 px: 729 base + 162×162 grid downscaled to 81×81
    assert model_fingerprint(lm.model)["visual_tokens"] == 729 + 81 * 81
    out = lm.processor(images=[Image.new("RGB", (384, 384)), Image.new("RGB", (1000, 300))],
                       text=[lm.format_prompt("a"), lm.format_prompt("b")], return_tensors="pt", padding=True)
    counts = (out["input_ids"] == lm.model.config.image_token_index).sum(dim=1).tolist()
    for (h, w), n in zip(out["image_sizes"].tolist(), counts):
        assert packed_layout(lm.model.config, h, w)[0].numel() == n  # our geometry = the processor's count
    assert counts[0] == 729 + 27 * 28  # one 384-px crop: base + 27 rows of 27 tokens and a newline


def test_large_images_are_downscaled_and_newlines_follow_every_row(ov):
    newline, crops = packed_layout(ov.model.config, 96, 160)  # 3×5 crops: 24×40 downscaled to 18×30
    assert crops == 16 and int(newline.sum()) == 18 and int((~newline).sum()) == 64 + 18 * 30
    assert not newline[:64].any() and newline[64 + 30::31].all()
    newline, crops = packed_layout(ov.model.config, 96, 160, multi=True)  # one of several images: base crop only
    assert crops == 1 and newline.numel() == 65 and newline[-1] and not newline[:-1].any()


def test_multi_image_prompt_prunes_and_keeps_its_newlines(ov):
    model = ov.model
    images = [[Image.new("RGB", (64, 64), (200, 10, 10)), Image.new("RGB", (160, 96), (10, 10, 200))]]
    prompt = ov.format_prompt("Compare.").replace("<image>", "<image><image>")
    inputs = ov.processor(images=images, text=[prompt], return_tensors="pt")
    assert inputs["batch_num_images"].tolist() == [2]
    ids = inputs["input_ids"]
    assert int((ids == model.config.image_token_index).sum()) == 2 * 65
    fp = model_fingerprint(model)
    recipe = Recipe(keep_count=np.full(fp["num_layers"], fp["visual_tokens"]), scorer="fitprune", fingerprint=fp,
                    pre_llm={"method": "fopru-rank", "keep_ratio": 0.5, "params": {}})
    with recipe.apply(model) as handle, torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        request = handle.last_request
    assert int(request.visual_per_layer[0].sum()) == 2 * 32  # each base view keeps round(0.5 · 64)


def test_fopru_signal_is_the_attention_each_patch_receives(ov):
    from runtime.prellm_stage import PreLLMStage

    model = load_model("tiny-llava-onevision", attn_implementation="eager").model
    torch.manual_seed(0)
    pixels = torch.randn(1, 5, 3, 32, 32)
    sizes = torch.tensor([[64, 64]])
    stage = PreLLMStage(None, capture={"attention"})
    hooks = stage.attach(model)
    try:
        with torch.no_grad():
            model.model.get_image_features(pixel_values=pixels, image_sizes=sizes)
            own = model.model.vision_tower(pixels[0], output_attentions=True)
    finally:
        for hook in hooks:
            hook.remove()
    received = own.attentions[-1].mean(dim=(1, 2))  # (crops, patches): mean over heads and query rows
    torch.testing.assert_close(stage._encoded[-1].attention, received, rtol=1e-5, atol=1e-7)


def test_cls_inflection_is_refused_at_apply_and_compile_with_the_reason(ov, tmp_path, capsys):
    from recipe_compiler.cli import compile_main

    fp = model_fingerprint(ov.model)
    v, layers = fp["visual_tokens"], fp["num_layers"]
    recipe = Recipe(keep_count=np.array([v, v] + [v // 2] * (layers - 2)), scorer="text-mean", fingerprint=fp,
                    pre_llm={"method": "cls-inflection", "params": {"stage2_layer": 2, "stage2_ratio": 0.5}})
    with pytest.raises(RecipeMismatchError, match="no CLS token"):
        recipe.apply(ov.model)
    assert family_for(ov.model).signals["features"] == "its SigLIP vision encoder has no CLS token"
    code = compile_main(["--model", "tiny-llava-onevision", "--samples", "2", "--quiet", "--budget", "0.5",
                         "--pre-llm", "cls-inflection", "-o", str(tmp_path / "r.safetensors")])
    assert code != 0 and "no CLS token" in capsys.readouterr().err
    assert not (tmp_path / "r.safetensors").exists()


def test_the_vllm_plugin_refuses_onevision_with_the_reason(ov):
    import runtime.vllm as plugin
    from runtime import RecipeError

    fp = model_fingerprint(ov.model)
    recipe = Recipe(keep_count=np.full(fp["num_layers"], fp["visual_tokens"]), scorer="fitprune", fingerprint=fp,
                    pre_llm={"method": "g-prune", "keep_ratio": 0.5, "params": {}})
    with pytest.raises(RecipeError, match="LLaVA-OneVision is not served by the vLLM plugin"):
        plugin.overrides(recipe)


@pytest.mark.parametrize("alias", ["llava-onevision-qwen2-7b-ov"])
def test_flops_equal_the_flop_counter_at_real_size_on_the_meta_device(alias):
    """The real architecture, built without weights: a 1000×300 image (anyres crops) and 300 LM tokens."""
    from torch.utils.flop_counter import FlopCounterMode

    from recipe_compiler.families import FAMILIES, vision_shape
    from recipe_compiler.flops import LMShape, encoder_flops, layer_flops

    model = load_model(alias, random_weights=True, device="meta", dtype="bf16", attn_implementation="eager").model
    crops = packed_layout(model.config, 300, 1000)[1]
    kwargs = {"pixel_values": torch.empty(1, crops, 3, 384, 384, device="meta", dtype=torch.bfloat16),
              "image_sizes": torch.tensor([[300, 1000]])}
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.model.get_image_features(**kwargs)
    assert FAMILIES["llava_onevision"].image_crop_counts(model.config, kwargs) == [crops]
    assert encoder_flops(vision_shape(model.config), crops=crops) == pytest.approx(counter.get_total_flops(), rel=1e-12)
    shape, n = LMShape.from_config(model.config.text_config), 300
    lm = model.model.language_model  # one decoder layer (all are alike): the causal mask cannot be built on meta
    x = torch.empty(1, n, shape.hidden, device="meta", dtype=torch.bfloat16)
    positions = torch.arange(n, device="meta")[None]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        lm.layers[0](x, attention_mask=None, position_ids=positions, position_embeddings=lm.rotary_emb(x, positions))
    linear = sum(v for op, v in counter.get_flop_counts()["Global"].items() if str(op).split(".")[1] in ("mm", "addmm"))
    assert linear == layer_flops(shape, n) - 2 * shape.num_heads * shape.head_dim * n * (n + 1)

"""InternVL: the real aliases' architecture, the pixel-shuffle token geometry, and the CLS signals
mapped onto the shuffled tokens (checked against the model's own attention weights)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from recipe_compiler.models import REGISTRY, load_model
from runtime import Recipe
from runtime.families import family_for, model_fingerprint
from runtime.families.internvl import shuffle_sources

REAL = {
    # alias: (hub id, hidden, layers, heads, kv heads, parameters of the whole VLM)
    "internvl3-1b": ("OpenGVLab/InternVL3-1B-hf", 896, 24, 14, 2, 0.938e9),
    "internvl3-2b": ("OpenGVLab/InternVL3-2B-hf", 1536, 28, 12, 2, 2.089e9),
    "internvl3-8b": ("OpenGVLab/InternVL3-8B-hf", 3584, 28, 28, 4, 7.944e9),
}


@pytest.mark.parametrize("alias", sorted(REAL))
def test_real_aliases_build_the_real_architecture_on_the_meta_device(alias):
    hub_id, hidden, layers, heads, kv, n_params = REAL[alias]
    lm = load_model(alias, random_weights=True, device="meta", dtype="bf16")
    assert lm.spec.hub_id == hub_id and type(lm.model).__name__ == "InternVLForConditionalGeneration"
    text = lm.model.config.text_config
    assert (text.model_type, text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (
        "qwen2", hidden, layers, heads, kv)
    assert sum(p.numel() for p in lm.model.parameters()) == pytest.approx(n_params, rel=1e-3)
    assert model_fingerprint(lm.model)["visual_tokens"] == 256  # one 448-px tile: (448/14 · 0.5)²
    ids = lm.processor.tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>"])
    assert ids == [151644, 151645, 151665, 151666, 151667] and lm.processor.tokenizer.pad_token_id == 151643


def test_each_shuffled_token_folds_one_2x2_block_of_patches():
    config = load_model("tiny-internvl").model.config
    side = 16  # 64-px tiles of 4-px patches
    sources = shuffle_sources(config)
    assert sources.shape == (64, 4)
    for token, patches in enumerate(sources.tolist()):
        r, c = divmod(token, side // 2)
        assert sorted(patches) == sorted((2 * r + dr) * side + 2 * c + dc for dr in (0, 1) for dc in (0, 1))


def test_tiles_and_placeholders_follow_dynamic_tiling():
    from PIL import Image

    lm = load_model("tiny-internvl")
    inputs = lm.processor(images=[Image.new("RGB", (128, 128)), Image.new("RGB", (192, 64)), Image.new("RGB", (64, 64))],
                          text=[lm.format_prompt("a"), lm.format_prompt("b"), lm.format_prompt("c")], return_tensors="pt", padding=True)
    # 2×2 tiles + thumbnail, 3×1 + thumbnail, one tile (no thumbnail); 64 tokens per tile
    assert inputs["pixel_values"].shape[0] == 5 + 4 + 1
    assert (inputs["input_ids"] == lm.model.config.image_token_id).sum(dim=1).tolist() == [320, 256, 64]


def test_fopru_and_cls_signals_are_the_encoders_own_mapped_onto_shuffled_tokens():
    """The recomputed CLS→patch attention equals the eager attention weights the encoder itself
    returns, summed over each token's 2×2 patches; the CLS similarity is the mean of its patches'."""
    from runtime.prellm_stage import PreLLMStage

    lm = load_model("tiny-internvl", attn_implementation="eager")
    model = lm.model
    family = family_for(model)
    torch.manual_seed(0)
    pixels = torch.randn(3, 3, 64, 64)
    stage = PreLLMStage(None, capture={"attention", "features"})
    hooks = stage.attach(model)
    try:
        with torch.no_grad():
            model.model.get_image_features(pixel_values=pixels)
            own = model.model.vision_tower(pixel_values=pixels, output_attentions=True, output_hidden_states=True)
    finally:
        for hook in hooks:
            hook.remove()
    encoded = stage._encoded[-1]
    assert len(encoded.blocks) == 3  # one block per tile
    sources = shuffle_sources(model.config)
    cls_row = own.attentions[-1][:, :, 0, 1:].mean(dim=1)  # (tiles, patches), last layer = feature layer -1
    features = own.hidden_states[-1]
    for tile in range(3):
        positions = torch.arange(64)
        [view] = family.views(model, None, 0, positions, encoded, tile, lambda name: getattr(encoded, name))
        assert view.grid == (8, 8)
        torch.testing.assert_close(view.attention, cls_row[tile][sources].sum(dim=-1), rtol=1e-5, atol=1e-7)
        cosine = torch.nn.functional.cosine_similarity(features[tile, 1:], features[tile, :1], dim=-1)
        torch.testing.assert_close(view.clssim, cosine[sources].mean(dim=-1), rtol=1e-5, atol=1e-6)


def test_the_vllm_plugin_refuses_internvl_with_the_reason():
    import runtime.vllm as plugin
    from runtime import RecipeError

    model = load_model("tiny-internvl").model
    fp = model_fingerprint(model)
    recipe = Recipe(keep_count=np.full(fp["num_layers"], fp["visual_tokens"]), scorer="fitprune", fingerprint=fp,
                    pre_llm={"method": "g-prune", "keep_ratio": 0.5, "params": {}})
    with pytest.raises(RecipeError, match="InternVL is not served by the vLLM plugin"):
        plugin.overrides(recipe)


@pytest.mark.parametrize("alias", ["internvl3-8b"])
def test_flops_equal_the_flop_counter_at_real_size_on_the_meta_device(alias):
    """The real architecture, built without weights: 3 tiles through the encoder, 300 tokens through the LM."""
    from torch.utils.flop_counter import FlopCounterMode

    from recipe_compiler.families import vision_shape
    from recipe_compiler.flops import LMShape, encoder_flops, layer_flops

    model = load_model(alias, random_weights=True, device="meta", dtype="bf16", attn_implementation="eager").model
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.model.get_image_features(pixel_values=torch.empty(3, 3, 448, 448, device="meta", dtype=torch.bfloat16))
    assert encoder_flops(vision_shape(model.config), crops=3) == pytest.approx(counter.get_total_flops(), rel=1e-12)
    shape, n = LMShape.from_config(model.config.text_config), 300
    lm = model.model.language_model  # one decoder layer (all are alike): the causal mask cannot be built on meta
    x = torch.empty(1, n, shape.hidden, device="meta", dtype=torch.bfloat16)
    positions = torch.arange(n, device="meta")[None]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        lm.layers[0](x, attention_mask=None, position_ids=positions, position_embeddings=lm.rotary_emb(x, positions))
    linear = sum(v for op, v in counter.get_flop_counts()["Global"].items() if str(op).split(".")[1] in ("mm", "addmm"))
    assert linear == layer_flops(shape, n) - 2 * shape.num_heads * shape.head_dim * n * (n + 1)

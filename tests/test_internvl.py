"""InternVL: the real aliases' architecture, the pixel-shuffle token geometry, and the CLS signals
mapped onto the shuffled tokens (checked against the model's own attention weights)."""
from __future__ import annotations

import pytest
import torch

from recipe_compiler.models import REGISTRY, load_model
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
    side = 8  # 32-px tiles of 4-px patches
    sources = shuffle_sources(config)
    assert sources.shape == (16, 4)
    for token, patches in enumerate(sources.tolist()):
        r, c = divmod(token, side // 2)
        assert sorted(patches) == sorted((2 * r + dr) * side + 2 * c + dc for dr in (0, 1) for dc in (0, 1))


def test_tiles_and_placeholders_follow_dynamic_tiling():
    from PIL import Image

    lm = load_model("tiny-internvl")
    inputs = lm.processor(images=[Image.new("RGB", (64, 64)), Image.new("RGB", (96, 32)), Image.new("RGB", (32, 32))],
                          text=[lm.format_prompt("a"), lm.format_prompt("b"), lm.format_prompt("c")], return_tensors="pt", padding=True)
    # 2×2 tiles + thumbnail, 3×1 + thumbnail, one tile (no thumbnail); 16 tokens per tile
    assert inputs["pixel_values"].shape[0] == 5 + 4 + 1
    assert (inputs["input_ids"] == lm.model.config.image_token_id).sum(dim=1).tolist() == [80, 64, 16]


def test_fopru_and_cls_signals_are_the_encoders_own_mapped_onto_shuffled_tokens():
    """The recomputed CLS→patch attention equals the eager attention weights the encoder itself
    returns, summed over each token's 2×2 patches; the CLS similarity is the mean of its patches'."""
    from runtime.prellm_stage import PreLLMStage

    lm = load_model("tiny-internvl", attn_implementation="eager")
    model = lm.model
    family = family_for(model)
    torch.manual_seed(0)
    pixels = torch.randn(3, 3, 32, 32)
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
        positions = torch.arange(16)
        [view] = family.views(model, None, 0, positions, encoded, tile, lambda name: getattr(encoded, name))
        assert view.grid == (4, 4)
        torch.testing.assert_close(view.attention, cls_row[tile][sources].sum(dim=-1), rtol=1e-5, atol=1e-7)
        cosine = torch.nn.functional.cosine_similarity(features[tile, 1:], features[tile, :1], dim=-1)
        torch.testing.assert_close(view.clssim, cosine[sources].mean(dim=-1), rtol=1e-5, atol=1e-6)

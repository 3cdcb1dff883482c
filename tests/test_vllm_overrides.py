"""runtime.vllm.overrides: what a vLLM user passes as hf_overrides (pure; vLLM itself is not needed here).

The plugin end to end (parity with the HF runtime, the server) is in tests/vllm, run in the vLLM
environment that scripts/vllm-env.sh builds.
"""
import json
from types import SimpleNamespace

import pytest

import runtime.vllm as plugin
from runtime import Recipe, RecipeError

FINGERPRINT = {"model_type": "llava", "num_layers": 4, "hidden_size": 128, "num_heads": 4, "num_kv_heads": 2,
               "visual_tokens": 144, "config_hash": "0123456789abcdef"}
GPRUNE = {"method": "g-prune", "keep_ratio": 0.25, "params": {"threshold": 0.4}}


def _save(tmp_path, name="r.safetensors", **kwargs):
    fingerprint = kwargs.pop("fingerprint", FINGERPRINT)
    recipe = Recipe.keep_all(fingerprint, **kwargs) if "keep_count" not in kwargs else Recipe(fingerprint=fingerprint, scorer="fitprune", **kwargs)
    return str(recipe.save(tmp_path / name))


def test_overrides_select_the_plugin_architecture_and_carry_the_recipe(tmp_path):
    path = _save(tmp_path, pre_llm=GPRUNE)
    out = plugin.overrides(path)
    assert out["architectures"] == ["RecipePrunedLlavaForConditionalGeneration"]
    assert out["text_config"] == {"rope_parameters": {"mrope_section": [16, 0, 0]}}  # head_dim 32: one row, plain RoPE
    assert json.loads(plugin.overrides_json(path)) == out  # the server's --hf-overrides value
    carried = plugin.recipe_from_config(SimpleNamespace(**{plugin.CONFIG_KEY: out[plugin.CONFIG_KEY]}))
    assert carried.to_bytes() == Recipe.keep_all(FINGERPRINT, pre_llm=GPRUNE).to_bytes()


def test_llava_next_gets_its_own_architecture(tmp_path):
    path = _save(tmp_path, fingerprint=dict(FINGERPRINT, model_type="llava_next"), pre_llm=GPRUNE)
    assert plugin.overrides(path)["architectures"] == ["RecipePrunedLlavaNextForConditionalGeneration"]


@pytest.mark.parametrize("pre_llm,fingerprint,match", [
    ({"method": "none"}, FINGERPRINT, "has no pre-LLM stage"),
    ({"method": "g-prune", "keep_ratio": 0.5, "params": {}}, dict(FINGERPRINT, model_type="qwen2_vl"), "Qwen2-VL is not served"),
    ({"method": "g-prune", "keep_ratio": 0.5, "params": {}}, dict(FINGERPRINT, model_type="paligemma"), "no vLLM plugin class"),
], ids=["no-stage", "qwen2-vl", "unknown-family"])
def test_recipes_the_plugin_cannot_serve_are_refused_with_the_reason(tmp_path, pre_llm, fingerprint, match):
    with pytest.raises(RecipeError, match=match):
        plugin.overrides(_save(tmp_path, fingerprint=fingerprint, pre_llm=pre_llm))


def test_cls_inflection_is_refused_because_its_count_depends_on_the_image(tmp_path):
    counts = [144, 144, 72, 72]
    pre_llm = {"method": "cls-inflection", "params": {"stage2_layer": 2, "stage2_ratio": 0.5}}
    recipe = Recipe(keep_count=counts, scorer="text-mean", fingerprint=FINGERPRINT, pre_llm=pre_llm)
    with pytest.raises(RecipeError, match="depends on the image's content"):
        plugin.overrides(recipe)


def test_an_in_llm_schedule_is_served_as_its_stage_or_refused_on_request(tmp_path):
    path = _save(tmp_path, keep_count=[144, 144, 72, 72], pre_llm=GPRUNE)
    assert plugin.overrides(path)[plugin.CONFIG_KEY]["keep_count"] == [144, 144, 72, 72]  # the model logs it once
    with pytest.raises(RecipeError, match=r"prunes inside the language model \(layers \[2\]\)"):
        plugin.overrides(path, in_llm_schedule="refuse")
    with pytest.raises(ValueError, match="in_llm_schedule='sometimes' is unknown"):
        plugin.overrides(path, in_llm_schedule="sometimes")


def test_a_missing_or_corrupt_recipe_is_a_recipe_error(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        plugin.overrides(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a recipe at all")
    with pytest.raises(RecipeError, match="not a valid recipe"):
        plugin.overrides(tmp_path / "junk.safetensors")
    with pytest.raises(RecipeError, match="has no recipe_compiler_recipe"):
        plugin.recipe_from_config(SimpleNamespace())

"""A model the runtime cannot prune is refused at ``apply()`` with a typed error, never inside ``generate``.

Gemma 3 (sliding and global attention layers) and Qwen3.5 (linear and full attention layers) are
families since issue 15 (tests/test_layer_kinds.py, tests/test_qwen3_5.py); with their family taken out
of the registry, tiny random models built from their own config
classes must be refused with :class:`runtime.errors.UnsupportedModelError` (a
``RecipeMismatchError``) naming the model type and what is supported, with nothing installed.
Their layers differ in kind, which the pruner does not handle: even once a family registers them
(issue 15), ``apply()`` keeps refusing until the family declares those layer kinds.
"""
from __future__ import annotations

import contextlib
import functools

import pytest
import torch

from runtime import Recipe, RecipeMismatchError
from runtime.errors import UnsupportedModelError
from runtime.families import FAMILIES, Family, model_fingerprint, supported_model_types
from runtime.methods.stages import STAGES
from runtime.prellm_stage import unsupported_reason
from runtime.pruner import PruningHandle


@functools.lru_cache(maxsize=None)
def _gemma3():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    config = Gemma3Config(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=300, sliding_window=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        mm_tokens_per_image=4, image_token_index=299, boi_token_index=297, eoi_token_index=298,
    )
    torch.manual_seed(0)
    return Gemma3ForConditionalGeneration(config).eval()


@functools.lru_cache(maxsize=None)
def _qwen3_5():
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    config = Qwen3_5Config(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=300, linear_num_key_heads=2,
                         linear_num_value_heads=2, linear_key_head_dim=16, linear_value_head_dim=16),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=4, spatial_merge_size=2, temporal_patch_size=2),
    )
    torch.manual_seed(0)
    return Qwen3_5ForConditionalGeneration(config).eval()


MODELS = {"gemma3": (_gemma3, "sliding_attention"), "qwen3_5": (_qwen3_5, "linear_attention")}


@contextlib.contextmanager
def _unregistered(model_type):
    """The registry without ``model_type``'s family (what a release without it would do)."""
    family = FAMILIES[model_type]
    FAMILIES.unregister(model_type)
    try:
        yield
    finally:
        FAMILIES.register(model_type, family)


def test_qwen3_5_is_supported_now_and_a_cut_after_a_linear_layer_is_refused(tiny):
    """Qwen3.5 (issue 15) is a family: its mixed layers are accepted; only probes on linear layers are refused."""
    model = _qwen3_5()
    assert set(model.config.text_config.layer_types) == {"linear_attention", "full_attention"}
    fingerprint = model_fingerprint(model)
    with Recipe.keep_all(fingerprint).apply(model):
        pass
    counts = [fingerprint["visual_tokens"]] + [1] * (fingerprint["num_layers"] - 1)
    before = _hooks(model)
    with pytest.raises(RecipeMismatchError, match="linear_attention layer with no attention rows"):
        Recipe(keep_count=counts, scorer="fitprune", fingerprint=fingerprint).apply(model)
    assert _hooks(model) == before


def _hooks(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("model_type", MODELS)
def test_the_tiny_models_really_mix_layer_kinds(model_type):
    build, other = MODELS[model_type]
    kinds = set(build().config.text_config.layer_types)
    assert kinds == {other, "full_attention"}, kinds


@pytest.mark.parametrize("model_type", MODELS)
def test_an_unsupported_family_is_refused_at_apply_with_the_supported_list(model_type, tiny):
    model = MODELS[model_type][0]()
    before = _hooks(model)
    with _unregistered(model_type), pytest.raises(UnsupportedModelError) as refused:
        Recipe.keep_all(model_fingerprint(tiny.model)).apply(model)
    assert isinstance(refused.value, RecipeMismatchError)
    message = str(refused.value)
    assert f"model type {model_type!r} is not supported" in message and "\n" not in message
    assert all(name in message for name in supported_model_types() if name != model_type)
    assert _hooks(model) == before and getattr(model, "_recipe_runtime_handle", None) is None


@pytest.mark.parametrize("model_type", MODELS)
def test_layers_of_another_kind_are_refused_even_in_a_registered_family(model_type):
    build, other = MODELS[model_type]
    model = build()

    class Registered(Family):  # what issue 15 adds first: where things are, no layer kinds beyond full attention
        def reference_visual_tokens(self, config):
            return 4

    saved = FAMILIES[model_type]
    FAMILIES.unregister(model_type)
    FAMILIES.register(model_type, Registered())
    try:
        recipe = Recipe.keep_all(FAMILIES[model_type].fingerprint(model))  # compiled for this very model
        before = _hooks(model)
        with pytest.raises(UnsupportedModelError, match=rf"{model_type}.*{other} decoder layers.*full_attention"):
            recipe.apply(model)
        with pytest.raises(UnsupportedModelError, match=other):  # the pruner itself never hooks such a model
            PruningHandle(model, recipe)
        assert _hooks(model) == before and getattr(model, "_recipe_runtime_handle", None) is None
        for method in STAGES:  # a family without pre-LLM stages refuses each one by name
            reason = unsupported_reason(model, method)
            assert repr(method) in reason and repr(model_type) in reason and "llava" in reason
    finally:
        FAMILIES.unregister(model_type)
        FAMILIES.register(model_type, saved)


def test_compiling_for_an_unsupported_model_is_refused_before_any_forward():
    from recipe_compiler.calibration import load_calibration
    from recipe_compiler.compile import CompileConfig, compile_recipe

    with _unregistered("qwen3_5"), pytest.raises(UnsupportedModelError, match="qwen3_5"):
        compile_recipe(_qwen3_5(), None, load_calibration(samples=1), CompileConfig(budget=0.5))

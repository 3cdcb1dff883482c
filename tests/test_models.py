"""Tests of recipe_compiler.models: registry, built-in tiny-llava, tokenizer, loader (all offline)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the package is not installed in the venv; run from the checkout
    sys.path.insert(0, str(ROOT))

from transformers import LlavaConfig, LlavaForConditionalGeneration  # noqa: E402

from recipe_compiler.errors import ModelNotFoundError  # noqa: E402
from recipe_compiler.families.llava import LLAVA_15_PROMPT_TEMPLATE  # noqa: E402
from recipe_compiler.models import (  # noqa: E402
    REGISTRY,
    LoadedModel,
    build_tiny_llava,
    load_model,
    parse_dtype,
    prepare_model,
    resolve_spec,
)
from recipe_compiler.tokenizer import builtin_tokenizer  # noqa: E402
from conftest import offline_hub  # noqa: E402


@pytest.fixture(autouse=True)
def _offline_empty_cache(monkeypatch, tmp_path):
    """Every test runs offline against an empty HF cache, whatever the machine has cached."""
    offline_hub(monkeypatch, tmp_path / "hf-cache")


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return build_tiny_llava(seed=0)


def _image(seed: int = 0, size=(64, 40)) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy(), mode="RGB")


def _state_digest(model) -> str:
    h = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------- registry


@pytest.mark.parametrize("alias", sorted(REGISTRY))
def test_every_embedded_config_builds_a_llava_config(alias):
    from transformers import AutoConfig

    from recipe_compiler.families import FAMILIES

    spec = REGISTRY[alias]
    assert spec.alias == alias
    fields = {k: v for k, v in spec.config.items() if k != "model_type"}
    config = AutoConfig.for_model(spec.config["model_type"], **fields)  # the family's own config class
    assert config.model_type == spec.config["model_type"] in FAMILIES
    assert "{prompt}" in spec.prompt_template
    placeholders = ("<image>", "<|image_pad|>", "<IMG_CONTEXT>", "<start_of_image>")  # LLaVA's, Qwen-VL's, InternVL's, Gemma 3's
    assert any(p in spec.prompt_template for p in placeholders)
    assert spec.description


REAL = {
    # alias: (hub id, hidden, layers, heads, intermediate, params of the whole VLM)
    "llava-1.5-7b": ("llava-hf/llava-1.5-7b-hf", 4096, 32, 32, 11008, 7.06e9),
    "llava-1.5-13b": ("llava-hf/llava-1.5-13b-hf", 5120, 40, 40, 13824, 13.35e9),
}


@pytest.mark.parametrize("alias", sorted(REAL))
def test_real_alias_config_numbers(alias):
    hub_id, hidden, layers, heads, inter, n_params = REAL[alias]
    spec = REGISTRY[alias]
    assert spec.hub_id == hub_id
    c = LlavaConfig(**spec.config)
    t, v = c.text_config, c.vision_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads) == (
        hidden, layers, heads, heads,
    )
    assert (t.intermediate_size, t.vocab_size, t.max_position_embeddings, t.rms_norm_eps) == (inter, 32064, 4096, 1e-5)
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size) == (1024, 24, 16, 4096)
    assert (v.image_size, v.patch_size, v.projection_dim) == (336, 14, 768)
    assert (c.image_token_index, c.pad_token_id, c.projector_hidden_act) == (32000, 32001, "gelu")
    assert (c.vision_feature_layer, c.vision_feature_select_strategy, c.image_seq_length) == (-2, "default", 576)
    assert (v.image_size // v.patch_size) ** 2 == 576

    lm = load_model(alias, random_weights=True, device="meta", dtype="fp16")
    assert lm.spec is spec
    assert all(p.device.type == "meta" and p.dtype == torch.float16 for p in lm.model.parameters())
    total = sum(p.numel() for p in lm.model.parameters())
    assert total == pytest.approx(n_params, rel=0.005)


def test_resolve_spec_is_case_insensitive_and_alias_only():
    assert resolve_spec("LLaVA-1.5-7B") is REGISTRY["llava-1.5-7b"]
    assert resolve_spec(" tiny-llava ") is REGISTRY["tiny-llava"]
    assert resolve_spec("llava-hf/llava-1.5-7b-hf") is None
    assert resolve_spec("nope") is None


def test_random_weights_alias_uses_builtin_processor_with_576_image_tokens():
    lm = load_model("llava-1.5-7b", random_weights=True, device="meta")
    assert "random weights" in lm.source and "not the real" in lm.source
    out = lm.processor(
        images=[_image(size=(500, 300))], text=[lm.format_prompt("What is this?")], return_tensors="pt", padding=True
    )
    assert int((out["input_ids"] == 32000).sum()) == 576
    assert tuple(out["pixel_values"].shape) == (1, 3, 336, 336)
    assert int(out["input_ids"].max()) < 32064
    assert not lm.model.training
    assert lm.model.config._attn_implementation == "sdpa"


# ---------------------------------------------------------------------------------- tiny-llava


def test_tiny_llava_builds_fast_and_is_deterministic(tiny):
    start = time.perf_counter()
    again = build_tiny_llava(seed=0)
    assert time.perf_counter() - start < 1.0
    a, b = tiny.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = build_tiny_llava(seed=1).model.state_dict()
    assert not all(torch.equal(a[k], other[k]) for k in a)
    assert tiny.source == "built-in tiny-llava (random, seed 0)"
    assert tiny.spec is REGISTRY["tiny-llava"]


def test_tiny_llava_building_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_llava(seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_llava_weights_are_identical_across_processes(tiny):
    code = (
        "import hashlib, sys, torch\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from recipe_compiler.models import build_tiny_llava\n"
        "h = hashlib.sha256()\n"
        "for k, t in sorted(build_tiny_llava(seed=0).model.state_dict().items()):\n"
        "    h.update(k.encode()); h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())\n"
        "print(h.hexdigest())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip().splitlines()[-1] == _state_digest(tiny.model)


def test_tiny_llava_architecture(tiny):
    c = tiny.model.config
    t, v = c.text_config, c.vision_config
    assert isinstance(tiny.model, LlavaForConditionalGeneration)
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size) == (32, 2, 2, 64)
    assert (v.image_size, v.patch_size) == (96, 4)
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads) == (64, 8, 4, 2)
    assert (t.intermediate_size, t.head_dim, t.max_position_embeddings) == (128, 16, 1024)
    assert t.vocab_size == len(tiny.processor.tokenizer)
    assert not tiny.model.training
    assert not any(p.requires_grad for p in tiny.model.parameters())


def test_tiny_processor_expands_image_tokens_and_left_pads(tiny):
    assert tiny.format_prompt("What is this?") == LLAVA_15_PROMPT_TEMPLATE.format(prompt="What is this?")
    prompts = [tiny.format_prompt("What is in this picture, in detail?"), tiny.format_prompt("Hi")]
    out = tiny.processor(images=[_image(0), _image(1, (30, 90))], text=prompts, return_tensors="pt", padding=True)
    ids, mask = out["input_ids"], out["attention_mask"]
    assert tuple(out["pixel_values"].shape) == (2, 3, 96, 96)
    assert ((ids == tiny.image_token_id).sum(dim=1) == 576).all()
    assert mask[0].all()  # the longer prompt is not padded
    n_pad = int((mask[1] == 0).sum())
    assert n_pad > 0 and mask[1, :n_pad].eq(0).all() and mask[1, n_pad:].eq(1).all()  # padding on the LEFT
    assert (ids[1, :n_pad] == tiny.processor.tokenizer.pad_token_id).all()
    assert ids[1, n_pad] == tiny.processor.tokenizer.bos_token_id


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_tiny_forward_and_greedy_generate(tiny, attn):
    lm = build_tiny_llava(seed=0, attn_implementation=attn)
    assert lm.model.config._attn_implementation == attn
    prompts = [lm.format_prompt("What is this?"), lm.format_prompt("Describe it")]
    inputs = lm.processor(images=[_image(0), _image(1)], text=prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = lm.model(**inputs).logits
        ref = tiny.model(**inputs).logits  # sdpa
        out = lm.model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert logits.shape == (2, inputs["input_ids"].shape[1], lm.model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(logits[valid], ref[valid], rtol=1e-4, atol=1e-4)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 4)
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])


@pytest.mark.parametrize("dtype", ["bf16", torch.float16])
def test_tiny_llava_in_other_dtypes_is_the_fp32_model_cast(tiny, dtype):
    lm = load_model("tiny-llava", dtype=dtype)
    target = parse_dtype(dtype)
    ref = tiny.model.state_dict()
    for key, tensor in lm.model.state_dict().items():
        assert tensor.dtype == target
        assert torch.equal(tensor, ref[key].to(target))


def test_tiny_llava_on_meta_device():
    lm = load_model("TINY-LLAVA", device="meta")
    assert all(p.device.type == "meta" for p in lm.model.parameters())
    assert lm.name == "TINY-LLAVA"


# ---------------------------------------------------------------------------------- tokenizer

TEXTS = ["hello world", "  leading and trailing  ", "tab\tnew\nline", "héllo wörld ✓ 日本語 🙂", "a<b>c<ima</", ""]


@pytest.mark.parametrize("text", TEXTS)
def test_builtin_tokenizer_round_trips(text):
    tok = builtin_tokenizer(261, 259, 260)
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id == 1
    assert len(ids) == 1 + len(text.encode("utf-8"))  # one token per byte
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_builtin_tokenizer_matches_special_token_strings_whole():
    tok = builtin_tokenizer(261, 259, 260)
    ids = tok.encode("a</s><image>b", add_special_tokens=False)
    assert ids == [tok.convert_tokens_to_ids("a"), tok.eos_token_id, 259, tok.convert_tokens_to_ids("b")]
    assert tok.decode(ids) == "a</s><image>b"


@pytest.mark.parametrize(
    "vocab, image_id, pad_id",
    [(261, 259, 260), (32064, 32000, 32001), (300, 5, None), (262, 0, 261)],
)
def test_builtin_tokenizer_special_ids(vocab, image_id, pad_id):
    tok = builtin_tokenizer(vocab, image_id, pad_id)
    assert tok.convert_tokens_to_ids("<image>") == image_id
    assert tok.image_token == "<image>"
    if pad_id is not None:
        assert tok.pad_token_id == pad_id
    specials = {tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, image_id}
    assert len(specials) == 5 and max(specials) < vocab
    assert max(tok.get_vocab().values()) < vocab
    assert tok.padding_side == "left"
    ids = tok("x <image><image>y")["input_ids"]
    assert ids.count(image_id) == 2  # never split
    assert tok.decode(ids, skip_special_tokens=False).endswith("x <image><image>y")
    assert max(tok("any text ✓")["input_ids"]) < vocab


@pytest.mark.parametrize(
    "args",
    [(100, 50, None), (261, 261, None), (261, 259, 259), (261, -1, None), (261, 259, 300), (261.0, 259, None)],
)
def test_builtin_tokenizer_rejects_bad_ids(args):
    with pytest.raises(ValueError):
        builtin_tokenizer(*args)


# ---------------------------------------------------------------------------------- loader


def test_unknown_model_name_lists_aliases():
    with pytest.raises(ModelNotFoundError) as err:
        load_model("llava-9000")
    msg = str(err.value)
    assert "\n" not in msg
    assert all(alias in msg for alias in REGISTRY)


def test_uncached_hub_id_offline_names_cache_and_random_weights(tmp_path):
    with pytest.raises(ModelNotFoundError) as err:
        load_model("some-org/some-model")
    msg = str(err.value)
    assert "\n" not in msg
    assert str(tmp_path / "hf-cache" / "models--some-org--some-model") in msg
    assert "--random-weights" in msg and "huggingface-cli download some-org/some-model" in msg


def test_uncached_alias_offline_names_hub_id():
    with pytest.raises(ModelNotFoundError) as err:
        load_model("llava-1.5-7b")
    msg = str(err.value)
    assert msg.startswith("model 'llava-1.5-7b' (llava-hf/llava-1.5-7b-hf): weights not found in the HF cache")
    assert "models--llava-hf--llava-1.5-7b-hf" in msg and "--random-weights" in msg


def test_directory_without_config_is_rejected(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_model(str(tmp_path / "empty"))


def _save_tiny(lm: LoadedModel, directory: Path) -> None:
    lm.model.save_pretrained(directory)
    lm.processor.save_pretrained(directory)


def _logits(lm: LoadedModel) -> torch.Tensor:
    inputs = lm.processor(
        images=[_image(3)], text=[lm.format_prompt("What is this?")], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        return lm.model(**inputs).logits


def test_local_directory_round_trip(tiny, tmp_path):
    directory = tmp_path / "tiny-ckpt"
    _save_tiny(tiny, directory)
    lm = load_model(str(directory), attn_implementation="eager")
    assert lm.spec is None
    assert lm.source == f"local directory {directory.resolve()}"
    assert lm.model.config._attn_implementation == "eager"
    assert not lm.model.training and not any(p.requires_grad for p in lm.model.parameters())
    assert lm.processor.tokenizer.padding_side == "left"
    torch.testing.assert_close(_logits(lm), _logits(tiny), rtol=1e-4, atol=1e-4)


def test_hub_id_found_in_hf_cache(tiny, tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf-cache" / "models--my-org--tiny-llava"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    _save_tiny(tiny, repo / "snapshots" / commit)
    lm = load_model("my-org/tiny-llava")
    assert lm.source == f"HF cache {repo}"
    assert lm.spec is None
    torch.testing.assert_close(_logits(lm), _logits(tiny))


@pytest.mark.parametrize(
    "value, expected",
    [
        ("float32", torch.float32), ("fp32", torch.float32), ("FP16", torch.float16), ("float16", torch.float16),
        ("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16), ("torch.bfloat16", torch.bfloat16),
        (torch.float16, torch.float16), (torch.float32, torch.float32),
    ],
)
def test_parse_dtype(value, expected):
    assert parse_dtype(value) is expected


@pytest.mark.parametrize("value", ["float8", "int8", "", None, torch.int64, 32])
def test_bad_dtype_lists_choices(value):
    with pytest.raises(ValueError, match="bf16"):
        parse_dtype(value)
    with pytest.raises(ValueError):
        load_model("tiny-llava", dtype=value)


def _fake_cache_snapshot(cache: Path, repo_id: str) -> Path:
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


def test_random_weights_alias_prefers_a_cached_processor_and_fills_old_processor_geometry(tmp_path):
    import json

    builtin = load_model("llava-1.5-7b", random_weights=True, device="meta")
    snapshot = _fake_cache_snapshot(tmp_path / "hf-cache", "llava-hf/llava-1.5-7b-hf")
    builtin.processor.save_pretrained(snapshot)
    # Old llava-hf snapshots carry no patch_size / strategy: the loader fills them from the config.
    cfg_path = snapshot / "processor_config.json"
    saved = json.loads(cfg_path.read_text())
    for key in ("patch_size", "vision_feature_select_strategy", "num_additional_image_tokens"):
        saved.pop(key, None)
    cfg_path.write_text(json.dumps(saved))

    lm = load_model("llava-1.5-7b", random_weights=True, device="meta")
    assert "processor from HF cache" in lm.source and "models--llava-hf--llava-1.5-7b-hf" in lm.source
    out = lm.processor(images=[_image()], text=[lm.format_prompt("Q?")], return_tensors="pt", padding=True)
    assert int((out["input_ids"] == 32000).sum()) == 576


def test_random_weights_for_a_registered_hub_id_needs_no_cache():
    lm = load_model("llava-hf/llava-1.5-13b-hf", random_weights=True, device="meta")
    assert lm.spec is REGISTRY["llava-1.5-13b"]
    assert lm.source.startswith("random weights (llava-1.5-13b architecture, seed 0)")


@pytest.mark.parametrize("alias", sorted(REGISTRY))
def test_prepare_model_reads_no_weights_and_its_load_is_load_model(alias, monkeypatch):
    import recipe_compiler.models as models

    real = {name: getattr(models, name) for name in ("_random_model", "_model_class")}

    def refuse(*args, **kwargs):
        raise AssertionError("prepare_model built weights")

    monkeypatch.setattr(models, "_random_model", refuse)
    monkeypatch.setattr(models, "_model_class", refuse)
    plan = prepare_model(alias, random_weights=True)
    spec = REGISTRY[alias]
    text = spec.config.get("text_config", {})
    assert plan.spec is spec and plan.max_positions == plan.config.text_config.max_position_embeddings
    if "max_position_embeddings" in text:
        assert plan.max_positions == text["max_position_embeddings"]
    assert plan.format_prompt("Q?") == spec.prompt_template.replace("{prompt}", "Q?")
    for name, function in real.items():  # weights may be built from here on
        monkeypatch.setattr(models, name, function)
    device = "cpu" if spec.hub_id is None else "meta"
    loaded = plan.load(device=device)
    reference = load_model(alias, random_weights=True, device=device)
    assert loaded.processor is plan.processor and loaded.source == reference.source
    assert loaded.format_prompt("Q?") == reference.format_prompt("Q?") == plan.format_prompt("Q?")
    assert loaded.model.config.to_dict() == reference.model.config.to_dict()
    if device == "cpu":
        assert _state_digest(loaded.model) == _state_digest(reference.model)

"""--device-map: a checkpoint spread over devices by accelerate (from_pretrained(device_map=...)).

A CPU-only machine has one device, so these tests check the pass-through, the errors and that a
dispatched model compiles the same recipe. The split over two real devices (layers on cuda:0 and
on the CPU) runs only where CUDA is available.
"""
from __future__ import annotations

import sys

import pytest
import torch

from conftest import run_cli
from recipe_compiler import models
from recipe_compiler.cli import compile_main

FAST = ["--samples", "4", "--batch-size", "2", "--budget", "0.5", "--quiet"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny):
    directory = tmp_path_factory.mktemp("tiny-checkpoint")
    tiny.model.save_pretrained(directory)
    tiny.processor.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def plain_recipe(checkpoint, tmp_path_factory):
    """The recipe compiled from the checkpoint without --device-map."""
    out = tmp_path_factory.mktemp("plain") / "plain.safetensors"
    assert compile_main(["--model", str(checkpoint), "-o", str(out)] + FAST) == 0
    return out.read_bytes()


_run = run_cli


def _spy_from_pretrained(monkeypatch, checkpoint):
    """Record the keyword arguments the loader gives from_pretrained, and still load."""
    cls = models._model_class(models._read_config(checkpoint, "spy"))
    original = cls.from_pretrained.__func__
    seen = []

    def spy(klass, *args, **kwargs):
        seen.append(kwargs)
        return original(klass, *args, **kwargs)

    monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    return seen


def test_cli_device_map_reaches_from_pretrained_and_compiles_the_same_recipe(tmp_path, capsys, monkeypatch, checkpoint, plain_recipe):
    pytest.importorskip("accelerate")
    seen = _spy_from_pretrained(monkeypatch, checkpoint)
    mapped = tmp_path / "mapped.safetensors"
    code, _, err = _run(capsys, ["--model", str(checkpoint), "--device-map", "auto", "-o", str(mapped)] + FAST)
    assert code == 0, err
    assert [kw.get("device_map") for kw in seen] == ["auto"]
    assert mapped.read_bytes() == plain_recipe


def test_without_the_option_from_pretrained_gets_no_device_map(monkeypatch, checkpoint):
    seen = _spy_from_pretrained(monkeypatch, checkpoint)
    models.load_model(str(checkpoint))
    assert len(seen) == 1 and "device_map" not in seen[0]


def test_explicit_device_map_is_passed_through_and_gives_the_same_logits(monkeypatch, checkpoint, tiny):
    pytest.importorskip("accelerate")
    seen = _spy_from_pretrained(monkeypatch, checkpoint)
    loaded = models.load_model(str(checkpoint), device_map={"": "cpu"})
    assert [kw.get("device_map") for kw in seen] == [{"": "cpu"}]
    assert {p.device.type for p in loaded.model.parameters()} == {"cpu"}  # one device here: no dispatch hooks
    inputs = tiny.processor(images=[torch.zeros(3, 96, 96, dtype=torch.uint8)], text=[tiny.format_prompt("Hi?")], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(loaded.model(**inputs).logits, tiny.model(**inputs).logits)


def test_missing_accelerate_is_one_line_before_any_model_time(tmp_path, capsys, monkeypatch, checkpoint):
    monkeypatch.setitem(sys.modules, "accelerate", None)  # import accelerate now raises ImportError
    out = tmp_path / "r.safetensors"
    code, _, err = _run(capsys, ["--model", str(checkpoint), "--device-map", "auto", "-o", str(out)] + FAST)
    assert code != 0 and not out.exists()
    assert len(err.strip().splitlines()) == 1, err
    assert "needs accelerate" in err and "recipe-compiler[big]" in err


@pytest.mark.parametrize("extra", [["--model", "tiny-llava"], ["--model", "llava-1.5-7b", "--random-weights"]])
def test_device_map_on_a_built_model_is_refused_in_one_line(tmp_path, capsys, extra):
    out = tmp_path / "r.safetensors"
    code, _, err = _run(capsys, extra + ["--device-map", "auto", "-o", str(out)] + FAST)
    assert code != 0 and not out.exists()
    assert len(err.strip().splitlines()) == 1 and "--device-map applies to weights loaded from a checkpoint" in err


@pytest.mark.parametrize("text, expected", [("balanced", "applies to weights loaded"), ("nonsense", "auto, balanced"), ("{bad json", "not valid JSON"), ("{}", "non-empty")])
def test_device_map_option_is_validated(tmp_path, capsys, text, expected):
    code, _, err = _run(capsys, ["--model", "tiny-llava", "--device-map", text, "-o", str(tmp_path / "r.safetensors")] + FAST)
    assert code != 0 and expected in err and len(err.strip().splitlines()) == 1


def test_layers_dispatched_by_accelerate_give_the_same_statistics_and_verification(checkpoint, calibration):
    """Half the decoder layers on cuda:0 (when there is one), the rest and the towers on the CPU.

    Without CUDA both halves are on the CPU, but accelerate's device-alignment hooks are still
    forced onto every module, so the pruning hooks run under them as in a real split.
    """
    accelerate = pytest.importorskip("accelerate")
    from recipe_compiler.collect import collect_statistics
    from recipe_compiler.compile import CompileConfig, compile_recipe

    second = 0 if torch.cuda.is_available() else "cpu"
    reference = models.load_model(str(checkpoint))
    split = models.load_model(str(checkpoint))
    layers = len(split.model.model.language_model.layers)
    device_map = {"model.vision_tower": "cpu", "model.multi_modal_projector": "cpu", "model.language_model.embed_tokens": "cpu",
                  "model.language_model.rotary_emb": "cpu", "model.language_model.norm": second, "lm_head": second}
    device_map.update({f"model.language_model.layers.{i}": ("cpu" if i < layers // 2 else second) for i in range(layers)})
    accelerate.dispatch_model(split.model, device_map=device_map, main_device="cpu", force_hooks=True)
    assert hasattr(split.model.model.language_model.layers[layers - 1], "_hf_hook")
    if torch.cuda.is_available():
        assert {p.device.type for p in split.model.parameters()} == {"cpu", "cuda"}

    calibration = calibration.__class__(calibration.samples[:3], "three")  # one left-padded batch
    kwargs = dict(format_prompt=reference.format_prompt, batch_size=3)
    a = collect_statistics(reference.model, reference.processor, calibration, **kwargs)
    b = collect_statistics(split.model, split.processor, calibration, **kwargs)
    for name in ("cross", "self_attn", "last"):
        assert torch.allclose(torch.from_numpy(getattr(a, name)), torch.from_numpy(getattr(b, name)), atol=1e-5, equal_nan=True), name
    config = CompileConfig(0.5, batch_size=3)
    ra = compile_recipe(reference.model, reference.processor, calibration, config, format_prompt=reference.format_prompt, statistics=a)
    rb = compile_recipe(split.model, split.processor, calibration, config, format_prompt=split.format_prompt, statistics=a)
    assert (ra.recipe.keep_count == rb.recipe.keep_count).all()
    assert rb.verification.flops_fraction == ra.verification.flops_fraction
    assert abs(rb.verification.kl - ra.verification.kl) < 1e-4

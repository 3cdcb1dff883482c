"""Calibration input faults, through the Python API and ``recipe-compile``.

Each fault is one row: a builder that writes a manifest whose second entry (line 2, id ``b``)
has the fault, and the expected outcome: the entry works (converted or resized as needed), the
loader refuses it (before the model is even loaded), or the model-aware check refuses it
(through the API: before any forward; through the CLI: from the processor and config alone, before
any weight is loaded). Faults the loader already covers with its own wording
(missing file, corrupt bytes, truncated files without a global override, bad JSON, ...) are
tested in ``test_calibration.py``; this table adds the remaining ones and runs every refusal
through the CLI too.
"""
from __future__ import annotations

import builtins
import json
import os
import re
import struct
import warnings
import zlib
from pathlib import Path

import pytest
from PIL import Image, ImageFile

from recipe_compiler import calibration as calibration_module
from recipe_compiler.calibration import (
    MAX_ASPECT_RATIO,
    MAX_IMAGE_PIXELS,
    MIN_IMAGE_SIDE,
    default_calibration_path,
    load_calibration,
    load_image,
)
from recipe_compiler.cli import compile_main
from recipe_compiler.collect import check_inputs, model_inputs
from recipe_compiler.compile import CompileConfig, compile_recipe
from recipe_compiler.errors import CalibrationDataError
from conftest import offline_hub  # noqa: E402

SHIPPED = default_calibration_path().parent
WORKS, LOADER, MODEL = "works", "refused by the loader", "refused before the forward"


# ------------------------------------------------------------------------------------- builders
# Each writes what entry "b" needs into ``d`` and returns its manifest fields.


def _save(d: Path, name: str, image: Image.Image) -> dict:
    image.save(d / name)
    return {"image": name}


def _png_header_only(d: Path, name: str, width: int, height: int) -> dict:
    """A PNG that declares width x height but holds no pixel data: opening reads only this."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    (d / name).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return {"image": name}


def _truncated(d: Path, name: str, source: str, monkeypatch) -> dict:
    data = (SHIPPED / "images" / source).read_bytes()
    (d / name).write_bytes(data[: len(data) // 2])
    # Some libraries switch this on globally; validation must still refuse the file.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    return {"image": name}


def _unreadable(d: Path, monkeypatch) -> dict:
    target = d / "locked.png"
    Image.new("RGB", (16, 16)).save(target)
    real_open = builtins.open

    def denying_open(file, *args, **kwargs):  # root ignores chmod, so deny it here
        if Path(os.fspath(file)) == target:
            raise PermissionError(13, "Permission denied", os.fspath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(calibration_module, "open", denying_open, raising=False)
    return {"image": "locked.png"}


def _dangling_symlink(d: Path) -> dict:
    (d / "link.png").symlink_to(d / "deleted.png")
    return {"image": "link.png"}


def _rgba(d: Path) -> dict:
    image = Image.new("RGBA", (40, 30), (255, 0, 0, 255))
    image.putpixel((0, 0), (0, 0, 0, 0))
    return _save(d, "rgba.png", image)


def _high_bit_depth(d: Path) -> dict:
    image = Image.new("I;16", (24, 24), 1000)
    image.putpixel((0, 0), 60000)
    return _save(d, "deep.png", image)


FAULTS = [
    # (case, builder(d, monkeypatch) -> entry fields, outcome, words the error must contain)
    ("grayscale", lambda d, mp: _save(d, "gray.png", Image.new("L", (40, 30), 90)), WORKS, []),
    ("rgba with transparency", lambda d, mp: _rgba(d), WORKS, []),
    ("palette", lambda d, mp: _save(d, "pal.gif", Image.new("P", (40, 30), 3)), WORKS, []),
    ("16-bit grayscale", lambda d, mp: _high_bit_depth(d), WORKS, []),
    ("cmyk jpeg", lambda d, mp: _save(d, "cmyk.jpg", Image.new("CMYK", (40, 30), (0, 90, 90, 0))), WORKS, []),
    ("smallest accepted image", lambda d, mp: _save(d, "min.png", Image.new("RGB", (MIN_IMAGE_SIDE,) * 2)), WORKS, []),
    ("12 megapixel image", lambda d, mp: _save(d, "big.png", Image.new("L", (4000, 3000), 200)), WORKS, []),
    ("longest accepted aspect ratio", lambda d, mp: _save(d, "tall.png", Image.new("RGB", (8, 8 * MAX_ASPECT_RATIO))), WORKS, []),
    ("long prompt that fits", lambda d, mp: {"prompt": "Is it red? " * 30}, WORKS, []),
    ("1x1 image", lambda d, mp: _save(d, "dot.png", Image.new("RGB", (1, 1))), LOADER,
     ["1x1 pixels", "smaller than 8x8", "use a larger image"]),
    ("2x2 image", lambda d, mp: _save(d, "two.png", Image.new("L", (2, 2))), LOADER, ["2x2 pixels", "smaller than 8x8"]),
    ("over the pixel limit", lambda d, mp: _png_header_only(d, "huge.png", 10000, 10000), LOADER,
     ["10000x10000 pixels", f"limit of {MAX_IMAGE_PIXELS} pixels", "downscale it"]),
    ("decompression bomb", lambda d, mp: _png_header_only(d, "bomb.png", 30000, 30000), LOADER,
     ["too large to decode safely", "downscale it"]),
    ("too elongated", lambda d, mp: _save(d, "strip.png", Image.new("L", (8, 8 * MAX_ASPECT_RATIO + 8))), LOADER,
     [f"8x{8 * MAX_ASPECT_RATIO + 8} pixels", f"more than {MAX_ASPECT_RATIO} times longer", "crop it"]),
    ("zero-byte file", lambda d, mp: (d / "empty.png").touch() or {"image": "empty.png"}, LOADER,
     ["empty file (0 bytes)"]),
    ("text saved as .png", lambda d, mp: (d / "notes.png").write_text("not an image\n") and {"image": "notes.png"},
     LOADER, ["notes.png", "cannot be decoded", "replace it with a valid image file"]),
    ("unsupported format", lambda d, mp: (d / "logo.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")
     and {"image": "logo.svg"}, LOADER, ["logo.svg", "cannot be decoded"]),
    ("truncated png, truncated loading on", lambda d, mp: _truncated(d, "half.png", "text.png", mp), LOADER,
     ["half.png", "cannot be decoded", "truncated"]),
    ("truncated jpeg, truncated loading on", lambda d, mp: _truncated(d, "half.jpg", "coffee.jpg", mp), LOADER,
     ["half.jpg", "cannot be decoded"]),
    ("permission denied", lambda d, mp: _unreadable(d, mp), LOADER,
     ["locked.png", "cannot be read", "Permission denied", "check its permissions"]),
    ("dangling symlink", lambda d, mp: _dangling_symlink(d), LOADER, ["link.png", "broken symbolic link", "deleted.png"]),
    ("image is a folder", lambda d, mp: (d / "dir.png").mkdir() or {"image": "dir.png"}, LOADER, ["not a file"]),
    ("empty prompt", lambda d, mp: {"prompt": ""}, LOADER, ['"prompt" is empty']),
    ("whitespace prompt", lambda d, mp: {"prompt": " \t "}, LOADER, ['"prompt" is only whitespace']),
    ("invisible prompt: NUL and zero-width space", lambda d, mp: {"prompt": "\u0000\u200b"}, LOADER,
     ['"prompt" is only invisible characters (U+0000 U+200B)']),
    ("invisible prompt: control characters", lambda d, mp: {"prompt": "\x07\x1b\x7f"}, LOADER,
     ['"prompt" is only invisible characters (U+0007 U+001B U+007F)']),
    ("invisible prompt: format characters", lambda d, mp: {"prompt": "\ufeff\u2060\u200d"}, LOADER,
     ['"prompt" is only invisible characters (U+FEFF U+2060 U+200D)']),
    ("invisible prompt: combining marks only", lambda d, mp: {"prompt": "\u0301\u0308"}, LOADER,
     ['"prompt" is only invisible characters (U+0301 U+0308)']),
    ("invisible prompt: spaces and a filler", lambda d, mp: {"prompt": "\u3000\u3164 \u00a0"}, LOADER,
     ['"prompt" is only invisible characters (U+3000 U+3164 U+0020 U+00A0)']),
    ("visible prompt with invisible characters", lambda d, mp: {"prompt": "\u200bWhat is it?\u0000"}, WORKS, []),
    ("prompt longer than the model's positions", lambda d, mp: {"prompt": "Is it red? " * 60}, MODEL,
     ["prompt is too long", "more than the model's 1024 positions", "shorten the prompt"]),
    ("prompt holding the image placeholder", lambda d, mp: {"prompt": "What is in <image>?"}, MODEL,
     ["processor rejects it", "must not contain the image placeholder"]),
]
IDS = [row[0] for row in FAULTS]
ROWS = [row[1:] for row in FAULTS]


def write_set(d: Path, builder, monkeypatch) -> Path:
    """A manifest with a good entry "a" and entry "b" made by ``builder``."""
    d.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (48, 32), (10, 120, 200)).save(d / "ok.png")
    b = {"id": "b", "image": "ok.png", "prompt": "What colour is it?", **builder(d, monkeypatch)}
    lines = [{"id": "a", "image": "ok.png", "prompt": "What is shown?"}, b]
    manifest = d / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return manifest


def entry_name(manifest: Path) -> str:
    return f"calibration entry 2 ({manifest.resolve()} line 2, id 'b')"


@pytest.fixture
def forwards(tiny):
    """Counts calls of the tiny model's forward while the test runs."""
    calls = []
    handle = tiny.model.register_forward_pre_hook(lambda module, args: calls.append(1))
    yield calls
    handle.remove()


# ------------------------------------------------------------------------------------------ API


@pytest.mark.parametrize("builder, outcome, words", ROWS, ids=IDS)
def test_fault_through_the_api(tmp_path: Path, monkeypatch, tiny, forwards, builder, outcome, words):
    manifest = write_set(tmp_path, builder, monkeypatch)
    truncated_setting = ImageFile.LOAD_TRUNCATED_IMAGES
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        if outcome == LOADER:
            with pytest.raises(CalibrationDataError) as info:
                load_calibration(manifest)
        else:
            calib = load_calibration(manifest)
            if outcome == MODEL:
                with pytest.raises(CalibrationDataError) as info:
                    compile_recipe(tiny.model, tiny.processor, calib, CompileConfig(budget=0.5), format_prompt=tiny.format_prompt)
                assert forwards == []  # refused before any model time
            else:
                check_inputs(tiny.model, tiny.processor, calib, format_prompt=tiny.format_prompt)
                good, odd = calib.samples
                assert load_image(odd).mode == "RGB"
                inputs = model_inputs(tiny.model, tiny.processor, [good, odd], tiny.format_prompt)
                visual = (inputs["input_ids"] == tiny.image_token_id).sum(dim=1)
                assert visual.tolist() == [576, 576]  # resized to the model's input like any image
                assert inputs["pixel_values"].shape[0] == 2
                return
    assert ImageFile.LOAD_TRUNCATED_IMAGES == truncated_setting  # validation leaves the global as it was
    message = str(info.value)
    assert "\n" not in message
    assert entry_name(manifest) in message
    for word in words:
        assert word in message


def test_transparent_and_deep_images_convert_sensibly(tmp_path: Path, monkeypatch):
    for builder in (_rgba, _high_bit_depth):
        manifest = write_set(tmp_path / builder.__name__, lambda d, mp: builder(d), monkeypatch)
        odd = load_calibration(manifest).samples[1]
        image = load_image(odd)
        assert image.getpixel((0, 0)) == (255, 255, 255)  # transparent → white; 16-bit max → white
        assert image.getpixel((5, 5)) == ((255, 0, 0) if builder is _rgba else (0, 0, 0))


def test_dangling_symlink_in_a_folder_is_named_not_skipped(tmp_path: Path):
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    (tmp_path / "b.png").symlink_to(tmp_path / "gone.png")
    with pytest.raises(CalibrationDataError) as info:
        load_calibration(tmp_path)
    assert f"calibration entry 2 (image file {tmp_path / 'b.png'}, id 'b.png')" in str(info.value)
    assert "broken symbolic link" in str(info.value)


# ------------------------------------------------------------------------------------------ CLI


@pytest.fixture
def spy(monkeypatch, tiny):
    """Replace the CLI's weight loading with the session's tiny-llava, counting loads and forwards."""
    import recipe_compiler.models as models

    seen = {"loads": 0, "forwards": 0}

    def load(plan, **kwargs):
        assert plan.name == "tiny-llava"
        seen["loads"] += 1
        return tiny

    handle = tiny.model.register_forward_pre_hook(lambda module, args: seen.__setitem__("forwards", seen["forwards"] + 1))
    monkeypatch.setattr(models.ModelPlan, "load", load)
    yield seen
    handle.remove()


def _cli(manifest: Path, output: Path) -> int:
    return compile_main(["--model", "tiny-llava", "--budget", "0.5", "--calibration", str(manifest), "-o", str(output), "--quiet"])


@pytest.mark.parametrize(
    "builder, outcome, words", [row for row in ROWS if row[1] != WORKS], ids=[i for i, r in zip(IDS, ROWS) if r[1] != WORKS]
)
def test_fault_through_the_cli(tmp_path: Path, monkeypatch, capsys, spy, builder, outcome, words):
    manifest = write_set(tmp_path / "set", builder, monkeypatch)
    output = tmp_path / "recipe.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        code = _cli(manifest, output)
    captured = capsys.readouterr()
    assert code == 1
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("recipe-compile: error: ")
    assert entry_name(manifest) in captured.err
    for word in words:
        assert word in captured.err
    assert not output.exists()
    assert spy["forwards"] == 0
    assert spy["loads"] == 0  # every fault stops before any weight is loaded, the processor's and the positions' too


def test_cli_compiles_a_set_of_every_tolerated_fault(tmp_path: Path, monkeypatch, capsys, spy):
    """Every WORKS row in one manifest: the CLI writes a recipe calibrated on all of them."""
    d = tmp_path / "set"
    d.mkdir()
    Image.new("RGB", (48, 32), (10, 120, 200)).save(d / "ok.png")
    lines = [
        {"id": case, "image": "ok.png", "prompt": "What colour is it?", **builder(d, monkeypatch)}
        for case, builder, outcome, _ in FAULTS
        if outcome == WORKS
    ]
    manifest = d / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    output = tmp_path / "recipe.safetensors"
    assert _cli(manifest, output) == 0
    captured = capsys.readouterr()
    assert output.is_file()
    assert f"wrote {output}" in captured.out
    from runtime.recipe import load

    assert load(output).provenance["calibration"]["samples"] == len(lines)
    assert spy["loads"] == 1 and spy["forwards"] > 0


# ------------------------------------------------ prompts refused from the processor, before the weights


class WeightsLoaded(Exception):
    """Raised by the patched model constructors: something built or read weights."""


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny, tmp_path_factory):
    directory = tmp_path_factory.mktemp("checkpoint") / "tiny-llava"
    tiny.model.save_pretrained(directory)
    tiny.processor.save_pretrained(directory)
    return directory


@pytest.fixture
def no_weights(monkeypatch, tmp_path):
    """Make building random weights and from_pretrained (both go through these) raise WeightsLoaded.

    Offline with an empty HF cache, so an alias gets the built-in processor on every machine."""
    import recipe_compiler.models as models

    offline_hub(monkeypatch, tmp_path / "hf-cache")

    def refuse(*args, **kwargs):
        raise WeightsLoaded("model weights were built or read before the prompts were checked")

    monkeypatch.setattr(models, "_random_model", refuse)
    monkeypatch.setattr(models, "_model_class", refuse)


PROMPT_FAULTS = {  # fault -> (prompt, words of the one-line error)
    "too long": ("Is it red? " * 1000, ["the prompt is too long", "max_position_embeddings", "shorten the prompt"]),
    "image placeholder": ("What is in <image>?", ["processor rejects it", "must not contain the image placeholder"]),
}


@pytest.mark.parametrize("fault", sorted(PROMPT_FAULTS))
@pytest.mark.parametrize("model", ["tiny-llava", "local checkpoint", "llava-1.5-7b --random-weights"])
@pytest.mark.parametrize("command", ["recipe-compile", "recipe-eval"])
def test_prompts_the_processor_refuses_are_refused_before_any_weight_is_loaded(
    tmp_path, capsys, tiny, tiny_checkpoint, no_weights, command, model, fault
):
    from recipe_compiler.evaluate import main as eval_main
    from runtime.families import model_fingerprint
    from runtime.recipe import Recipe

    prompt, words = PROMPT_FAULTS[fault]
    manifest = write_set(tmp_path / "set", lambda d, mp: {"prompt": prompt}, None)
    name = {"local checkpoint": str(tiny_checkpoint)}.get(model, model.split()[0])
    flags = ["--random-weights"] if "--random-weights" in model else []
    output = tmp_path / "recipe.safetensors"
    if command == "recipe-compile":
        argv = ["--model", name, *flags, "--budget", "0.5", "--calibration", str(manifest), "-o", str(output), "--quiet"]
        main = compile_main
    else:
        keep = tmp_path / "keep.safetensors"
        Recipe.keep_all(model_fingerprint(tiny.model)).save(keep)
        argv = ["--model", name, *flags, "--recipe", str(keep), "--data", str(manifest)]
        main = eval_main
    code = main(argv)  # WeightsLoaded propagates if a weight is touched first
    captured = capsys.readouterr()
    assert code == 1 and captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith(f"{command}: error: "), captured.err
    assert entry_name(manifest) in captured.err
    for word in words:
        assert word in captured.err, captured.err
    assert not output.exists()


@pytest.mark.parametrize("prompt, words", [("\u200b\u0000", "the prompt is only invisible characters (U+200B U+0000)"),
                                           ("Is it red? " * 100, "the prompt is too long")])
@pytest.mark.parametrize("api", ["compile_recipe", "evaluate_recipes"])
def test_a_hand_built_set_with_a_bad_prompt_is_refused_by_the_api_before_any_forward(tiny, forwards, api, prompt, words):
    import dataclasses

    from recipe_compiler.calibration import CalibrationSet
    from recipe_compiler.evaluate import evaluate_recipes
    from runtime.families import model_fingerprint
    from runtime.recipe import Recipe

    good = load_calibration(samples=1).samples[0]
    samples = CalibrationSet((good, dataclasses.replace(good, id="odd", prompt=prompt, where="")), source="hand-built")
    with pytest.raises(CalibrationDataError, match=re.escape(words)) as info:
        if api == "compile_recipe":
            compile_recipe(tiny.model, tiny.processor, samples, CompileConfig(budget=0.5), format_prompt=tiny.format_prompt)
        else:
            evaluate_recipes(tiny.model, tiny.processor, samples, {"keep": Recipe.keep_all(model_fingerprint(tiny.model))},
                             format_prompt=tiny.format_prompt, repeats=1)
    assert "calibration sample 'odd'" in str(info.value)
    assert forwards == []

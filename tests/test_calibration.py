"""Calibration set loading: the shipped set, user folders and manifests, and bad-input errors."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # running the tests from a source tree that is not installed
    sys.path.insert(0, str(ROOT))

from recipe_compiler.calibration import (  # noqa: E402
    CalibrationSet,
    default_calibration_path,
    load_calibration,
    load_image,
)
from recipe_compiler.errors import CalibrationDataError, CompileError  # noqa: E402

SHIPPED = default_calibration_path().parent


def make_image(path: Path, size=(32, 24), mode="RGB", color=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode in ("L", "P"):
        color = 128
    elif mode == "RGBA":
        color = (*color[:3], 255)
    Image.new(mode, size, color).save(path)
    return path


def write_manifest(folder: Path, lines: list, name: str = "manifest.jsonl") -> Path:
    """Write lines (dicts as JSON, strings verbatim) to a manifest in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(
        "".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines),
        encoding="utf-8",
    )
    return path


def good(id_: str, image: str = "images/ok.png", **extra) -> dict:
    return {"id": id_, "image": image, "prompt": "What is shown?", **extra}


# ------------------------------------------------------------------------------------------
# the shipped set


def test_shipped_set_has_enough_calib_and_heldout_samples():
    calib = load_calibration()
    heldout = load_calibration(split="heldout")
    assert len(calib) >= 24
    assert len({s.image_path for s in calib.samples}) >= 12
    assert len(heldout) >= 4
    assert {s.split for s in calib.samples} == {"calib"}
    assert {s.split for s in heldout.samples} == {"heldout"}
    kinds = {s.kind for s in calib.samples}
    assert {"short", "choice", "describe", "ocr"} <= kinds
    assert all(s.image_path.is_absolute() for s in calib.samples)


def test_shipped_set_all_split_is_union_and_split_method_matches():
    everything = load_calibration(split=None)
    assert len(everything) == len(load_calibration()) + len(load_calibration(split="heldout"))
    assert everything.split("calib").samples == load_calibration().samples
    assert everything.split("heldout").source == everything.source


def test_every_shipped_image_is_licensed_small_and_rgb():
    images = sorted((SHIPPED / "images").iterdir())
    licences = (SHIPPED / "LICENSES.md").read_text(encoding="utf-8")
    assert len(images) >= 14
    for image_path in images:
        assert f"images/{image_path.name}" in licences, image_path.name
        with Image.open(image_path) as image:
            assert image.mode == "RGB", image_path.name
            assert max(image.size) <= 672, image_path.name
    total = sum(p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file())
    assert total < 4 * 1024 * 1024


def test_every_shipped_image_is_used_and_loads_as_rgb():
    everything = load_calibration(split=None)
    used = {s.image_path for s in everything.samples}
    assert used == {p.resolve() for p in (SHIPPED / "images").iterdir()}
    for sample in everything.samples:
        assert sample.prompt.strip()
        assert load_image(sample).mode == "RGB"


def test_shipped_set_is_readable_through_folder_and_manifest_paths():
    by_default = load_calibration()
    assert load_calibration(SHIPPED).samples == by_default.samples
    assert load_calibration(str(SHIPPED / "manifest.jsonl")).samples == by_default.samples


# ------------------------------------------------------------------------------------------
# fingerprint


@pytest.fixture
def shipped_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(SHIPPED / "images", copy / "images")
    shutil.copy(SHIPPED / "manifest.jsonl", copy / "manifest.jsonl")
    return copy


def _edit_first_prompt(folder: Path) -> None:
    manifest = folder / "manifest.jsonl"
    lines = manifest.read_text(encoding="utf-8").splitlines()
    first = json.loads(lines[0])
    first["prompt"] += " Be brief."
    lines[0] = json.dumps(first)
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _edit_first_image(folder: Path) -> None:
    sample = load_calibration(folder).samples[0]
    with Image.open(sample.image_path) as image:
        edited = image.convert("RGB")
    edited.putpixel((0, 0), (0, 255, 0))
    edited.save(sample.image_path)


def _reorder(folder: Path) -> None:
    manifest = folder / "manifest.jsonl"
    lines = manifest.read_text(encoding="utf-8").splitlines()
    lines[0], lines[1] = lines[1], lines[0]
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_fingerprint_is_stable_across_loads_and_locations(shipped_copy: Path):
    shipped = load_calibration().fingerprint()
    assert len(shipped) == 64 and int(shipped, 16) >= 0
    assert load_calibration().fingerprint() == shipped
    assert load_calibration(shipped_copy).fingerprint() == shipped


@pytest.mark.parametrize("edit", [_edit_first_prompt, _edit_first_image, _reorder])
def test_fingerprint_changes_with_content(shipped_copy: Path, edit):
    before = load_calibration(shipped_copy).fingerprint()
    edit(shipped_copy)
    assert load_calibration(shipped_copy).fingerprint() != before


def test_fingerprint_depends_on_selection():
    assert load_calibration(samples=5).fingerprint() != load_calibration().fingerprint()
    assert load_calibration(split="heldout").fingerprint() != load_calibration().fingerprint()


# ------------------------------------------------------------------------------------------
# user folders and manifests


def test_folder_without_manifest_uses_every_image_sorted(tmp_path: Path):
    make_image(tmp_path / "b.png")
    make_image(tmp_path / "a.jpg")
    make_image(tmp_path / "c.webp")
    make_image(tmp_path / "d.TIFF")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sub").mkdir()
    make_image(tmp_path / "sub" / "e.png")

    calib = load_calibration(tmp_path)
    assert [s.id for s in calib.samples] == ["a.jpg", "b.png", "c.webp", "d.TIFF"]
    assert {s.prompt for s in calib.samples} == {"Describe the image in detail."}
    assert {(s.kind, s.split) for s in calib.samples} == {("describe", "calib")}
    assert calib.source == str(tmp_path.resolve())


def test_manifest_defaults_and_relative_and_absolute_paths(tmp_path: Path):
    make_image(tmp_path / "data" / "images" / "ok.png")
    elsewhere = make_image(tmp_path / "elsewhere" / "abs.png")
    manifest = write_manifest(
        tmp_path / "data",
        [
            {"image": "images/ok.png", "prompt": "What color is it?"},
            "",
            {"id": "abs", "image": str(elsewhere), "prompt": "Describe it.", "kind": "describe"},
            {"id": "h", "image": "images/ok.png", "prompt": "Q?", "split": "heldout"},
        ],
    )
    calib = load_calibration(manifest)
    assert [s.id for s in calib.samples] == ["1", "abs"]  # missing id -> its line number
    assert calib.samples[0].image_path == (tmp_path / "data" / "images" / "ok.png").resolve()
    assert calib.samples[0].kind == "other"
    assert calib.samples[1].image_path == elsewhere.resolve()
    assert [s.id for s in load_calibration(manifest, split=None).samples] == ["1", "abs", "h"]


@pytest.mark.parametrize("count", [1, 3, 24])
def test_samples_keeps_the_first_n_after_the_split_filter(count: int):
    full = load_calibration()
    first = load_calibration(samples=count)
    assert first.samples == full.samples[:count]
    heldout = load_calibration(samples=2, split="heldout")
    assert heldout.samples == load_calibration(split="heldout").samples[:2]


@pytest.mark.parametrize(
    "mode, suffix",
    [("L", ".png"), ("RGBA", ".png"), ("P", ".png"), ("LA", ".png"), ("I;16", ".png"),
     ("CMYK", ".jpg"), ("1", ".bmp")],
)
def test_non_rgb_images_load_as_rgb(tmp_path: Path, mode: str, suffix: str):
    path = tmp_path / f"img{suffix}"
    if mode == "I;16":
        Image.new("I;16", (16, 16), 40000).save(path)
    elif mode == "LA":
        Image.new("LA", (16, 16), (100, 255)).save(path)
    elif mode == "1":
        Image.new("1", (16, 16), 1).save(path)
    elif mode == "CMYK":
        Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path)
    else:
        make_image(path, size=(16, 16), mode=mode)
    (sample,) = load_calibration(tmp_path).samples
    image = load_image(sample)
    assert image.mode == "RGB" and image.size == (16, 16)


def test_transparent_pixels_are_composited_on_white(tmp_path: Path):
    image = Image.new("RGBA", (10, 10), (255, 0, 0, 255))
    image.putpixel((0, 0), (0, 0, 0, 0))
    image.save(tmp_path / "t.png")
    (sample,) = load_calibration(tmp_path).samples
    loaded = load_image(sample)
    assert loaded.getpixel((0, 0)) == (255, 255, 255)
    assert loaded.getpixel((5, 5)) == (255, 0, 0)


def test_grayscale_keeps_its_values(tmp_path: Path):
    Image.new("L", (10, 10), 77).save(tmp_path / "g.png")
    (sample,) = load_calibration(tmp_path).samples
    assert load_image(sample).getpixel((3, 3)) == (77, 77, 77)


# ------------------------------------------------------------------------------------------
# bad inputs: every one is a CalibrationDataError naming the entry


def _missing_image(d: Path) -> Path:
    return write_manifest(d, [good("a"), good("b", "images/missing.png")])


def _corrupt_image(d: Path) -> Path:
    (d / "images").mkdir(parents=True, exist_ok=True)
    (d / "images" / "bad.png").write_bytes(os.urandom(4096))
    return write_manifest(d, [good("a"), good("b", "images/bad.png")])


def _truncated_png(d: Path) -> Path:
    data = (SHIPPED / "images" / "text.png").read_bytes()
    (d / "images").mkdir(parents=True, exist_ok=True)
    (d / "images" / "half.png").write_bytes(data[: len(data) // 2])
    return write_manifest(d, [good("a"), good("b", "images/half.png")])


def _truncated_jpeg(d: Path) -> Path:
    data = (SHIPPED / "images" / "coffee.jpg").read_bytes()
    (d / "images").mkdir(parents=True, exist_ok=True)
    (d / "images" / "half.jpg").write_bytes(data[: len(data) // 2])
    return write_manifest(d, [good("a"), good("b", "images/half.jpg")])


def _image_is_folder(d: Path) -> Path:
    (d / "images" / "dir.png").mkdir(parents=True)
    return write_manifest(d, [good("a"), good("b", "images/dir.png")])


def _empty_prompt(d: Path) -> Path:
    return write_manifest(d, [good("a"), {"id": "b", "image": "images/ok.png", "prompt": ""}])


def _whitespace_prompt(d: Path) -> Path:
    return write_manifest(d, [good("a"), {"id": "b", "image": "images/ok.png", "prompt": " \t\n"}])


def _missing_prompt(d: Path) -> Path:
    return write_manifest(d, [good("a"), {"id": "b", "image": "images/ok.png"}])


def _non_string_prompt(d: Path) -> Path:
    return write_manifest(d, [good("a"), {"id": "b", "image": "images/ok.png", "prompt": 3}])


def _missing_image_key(d: Path) -> Path:
    return write_manifest(d, [good("a"), {"id": "b", "prompt": "Q?"}])


def _empty_image_key(d: Path) -> Path:
    return write_manifest(d, [good("a"), {"id": "b", "image": " ", "prompt": "Q?"}])


def _malformed_json(d: Path) -> Path:
    return write_manifest(d, [good("a"), '{"id": "b", "image": "images/ok.png", "prompt": '])


def _non_object_line(d: Path) -> Path:
    return write_manifest(d, [good("a"), '["images/ok.png", "What is shown?"]'])


def _duplicate_ids(d: Path) -> Path:
    return write_manifest(d, [good("b"), good("x"), good("b")])


def _duplicate_default_id(d: Path) -> Path:
    return write_manifest(d, [good("a"), {"image": "images/ok.png", "prompt": "Q?"}, good("2")])


def _too_small(d: Path) -> Path:
    make_image(d / "images" / "tiny.png", size=(7, 64))
    return write_manifest(d, [good("a"), good("b", "images/tiny.png")])


def _unknown_split(d: Path) -> Path:
    return write_manifest(d, [good("a"), good("b", split="train")])


def _unknown_kind(d: Path) -> Path:
    return write_manifest(d, [good("a"), good("b", kind="essay")])


def _bad_id(d: Path) -> Path:
    return write_manifest(d, [good("a"), {"id": "", "image": "images/ok.png", "prompt": "Q?"}])


BAD_ENTRIES = [
    # (case, setup, line number of the bad entry, id named or None, words in the message)
    ("missing image file", _missing_image, 2, "b", ["not found", "missing.png", "fix the path"]),
    ("corrupt image", _corrupt_image, 2, "b", ["cannot be decoded", "bad.png"]),
    ("truncated png", _truncated_png, 2, "b", ["cannot be decoded", "half.png"]),
    ("truncated jpeg", _truncated_jpeg, 2, "b", ["cannot be decoded", "half.jpg"]),
    ("image is a folder", _image_is_folder, 2, "b", ["not a file"]),
    ("empty prompt", _empty_prompt, 2, "b", ['"prompt" is empty']),
    ("whitespace prompt", _whitespace_prompt, 2, "b", ['"prompt" is only whitespace']),
    ("missing prompt", _missing_prompt, 2, "b", ['"prompt" is missing']),
    ("non-string prompt", _non_string_prompt, 2, "b", ['"prompt" is not a string']),
    ("missing image key", _missing_image_key, 2, "b", ['"image" is missing']),
    ("blank image key", _empty_image_key, 2, "b", ['"image" is not a non-empty string']),
    ("malformed json", _malformed_json, 2, None, ["not valid JSON"]),
    ("non-object line", _non_object_line, 2, None, ["expected a JSON object", "an array"]),
    ("duplicate ids", _duplicate_ids, 3, "b", ["duplicate id", "line 1"]),
    ("duplicate default id", _duplicate_default_id, 3, "2", ["duplicate id", "line 2"]),
    ("too small image", _too_small, 2, "b", ["7x64", "smaller than 8x8"]),
    ("unknown split", _unknown_split, 2, "b", ["unknown split 'train'"]),
    ("unknown kind", _unknown_kind, 2, "b", ["unknown kind 'essay'"]),
    ("empty id", _bad_id, 2, None, ['"id" must be a non-empty string']),
]


@pytest.mark.parametrize(
    "setup, line, id_, words", [c[1:] for c in BAD_ENTRIES], ids=[c[0] for c in BAD_ENTRIES]
)
def test_bad_entry_is_named_in_a_one_line_error(tmp_path: Path, setup, line, id_, words):
    make_image(tmp_path / "images" / "ok.png")
    manifest = setup(tmp_path)
    with pytest.raises(CalibrationDataError) as info:
        load_calibration(manifest)
    message = str(info.value)
    assert "\n" not in message
    assert f"{manifest.resolve()} line {line}" in message
    assert f"calibration entry {line}" in message
    if id_ is not None:
        assert f"id {id_!r}" in message
    for word in words:
        assert word in message
    assert isinstance(info.value, CompileError)


def test_bad_entry_is_found_through_the_folder_too(tmp_path: Path):
    make_image(tmp_path / "images" / "ok.png")
    _missing_image(tmp_path)
    with pytest.raises(CalibrationDataError, match=r"line 2, id 'b'\): image 'images/missing.png'"):
        load_calibration(tmp_path)


@pytest.mark.parametrize("name", ["bad.png", "half.png", "tiny.png"])
def test_bad_image_in_folder_without_manifest_is_named(tmp_path: Path, name: str):
    make_image(tmp_path / "a_ok.png")
    if name == "bad.png":
        (tmp_path / name).write_bytes(os.urandom(1000))
    elif name == "half.png":
        data = (SHIPPED / "images" / "horse.png").read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
    else:
        make_image(tmp_path / name, size=(8, 4))
    with pytest.raises(CalibrationDataError) as info:
        load_calibration(tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert f"calibration entry 2 (image file {(tmp_path / name).resolve()}, id {name!r})" in message


def test_missing_calibration_path(tmp_path: Path):
    missing = tmp_path / "nowhere"
    with pytest.raises(CalibrationDataError) as info:
        load_calibration(missing)
    assert str(info.value) == (
        f"calibration data not found at {missing}; pass --calibration with a folder of images "
        "or a .jsonl manifest"
    )


@pytest.mark.parametrize(
    "setup, kwargs, words",
    [
        (lambda d: d, {}, ["no image files"]),  # empty folder
        (lambda d: write_manifest(d, ["", "  "]), {}, ["has no entries"]),
        (lambda d: write_manifest(d, [good("a")]), {"split": "heldout"},
         ["no entries with split 'heldout'", "1 'calib'"]),
        (lambda d: write_manifest(d, [good("a"), good("b")]), {"samples": 3},
         ["has only 2 entries with split 'calib'", "samples=3"]),
        (lambda d: write_manifest(d, [good("a")]), {"samples": 0}, ["positive integer"]),
        (lambda d: write_manifest(d, [good("a")]), {"samples": True}, ["positive integer"]),
        (lambda d: write_manifest(d, [good("a")]), {"split": "train"}, ["unknown calibration split"]),
        (lambda d: make_image(d / "one.png"), {}, ["neither a folder nor a .jsonl manifest"]),
    ],
    ids=["empty folder", "empty manifest", "empty split", "too many samples", "zero samples",
         "bool samples", "unknown split", "image instead of manifest"],
)
def test_bad_selection_is_an_error(tmp_path: Path, setup, kwargs, words):
    folder = tmp_path / "case"
    make_image(folder / "images" / "ok.png")  # in a subfolder: not picked up by a folder scan
    target = setup(folder)
    with pytest.raises(CalibrationDataError) as info:
        load_calibration(target, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_split_method_rejects_unknown_split():
    with pytest.raises(CalibrationDataError, match="unknown calibration split"):
        load_calibration().split("test")
    assert isinstance(load_calibration(), CalibrationSet)


def test_load_image_reports_a_file_removed_after_loading(tmp_path: Path):
    path = make_image(tmp_path / "gone.png")
    (sample,) = load_calibration(tmp_path).samples
    path.unlink()
    with pytest.raises(CalibrationDataError, match="gone.png"):
        load_image(sample)
    with pytest.raises(CalibrationDataError, match="gone.png"):
        CalibrationSet((sample,), "x").fingerprint()

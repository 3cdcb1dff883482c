"""Calibration sets: the images and prompts the compiler runs the unpruned model on.

A calibration set is read from one of three places:

* nothing (``None``): the set shipped in the ``calibration_data`` package;
* a ``.jsonl`` manifest, one JSON object per line::

      {"id": "cat-q", "image": "images/cat.png", "prompt": "Which animal is shown? ...",
       "kind": "choice", "split": "calib"}

  ``image`` and ``prompt`` are required; ``image`` is relative to the manifest's folder or
  absolute. ``id`` defaults to the line number, ``kind`` to ``"other"`` and ``split`` to
  ``"calib"``. Other keys are ignored. Blank lines are skipped;
* a folder: its ``manifest.jsonl`` if it has one, else every image file directly inside it
  (sorted by name), each with the prompt ``"Describe the image in detail."``.

Everything is validated when the set is loaded, before any model time is spent: each selected
image must be a readable, non-empty file that decodes completely (even if something set
``PIL.ImageFile.LOAD_TRUNCATED_IMAGES``), at least ``MIN_IMAGE_SIDE`` pixels a side, at most
``MAX_IMAGE_PIXELS`` pixels (checked from the header, before decoding) and at most
``MAX_ASPECT_RATIO`` times longer than wide; prompts must hold a visible character (not empty,
not only whitespace or invisible characters such as U+0000 or U+200B: :func:`prompt_problem`).
Grayscale, palette, 16-bit, CMYK and transparent images are accepted and converted to RGB by
:func:`load_image`. Checks that need the model's processor and config (the prompt and image
tokens fit its positions, the processor accepts the entry) run in
:func:`recipe_compiler.collect.check_prompts`, which the CLIs call before any weight is loaded. Every problem raises :class:`~recipe_compiler.errors.CalibrationDataError` with a
one-line message naming the entry and the fix.

This module needs only the standard library and Pillow (no torch).
"""
from __future__ import annotations

import hashlib
import json
import os
import unicodedata
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageFile, ImageOps

from recipe_compiler.errors import CalibrationDataError

__all__ = [
    "CalibrationSample",
    "CalibrationSet",
    "default_calibration_path",
    "load_calibration",
    "load_image",
    "prompt_problem",
    "KINDS",
    "SPLITS",
    "IMAGE_SUFFIXES",
    "DEFAULT_PROMPT",
    "MIN_IMAGE_SIDE",
    "MAX_IMAGE_PIXELS",
    "MAX_ASPECT_RATIO",
]

KINDS = ("short", "choice", "describe", "ocr", "other")
"""Accepted values of an entry's ``kind``."""

SPLITS = ("calib", "heldout")
"""Accepted values of an entry's ``split``."""

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
"""File suffixes (case-insensitive) taken from a folder without a manifest."""

DEFAULT_PROMPT = "Describe the image in detail."
"""Prompt given to every image of a folder without a manifest."""

MIN_IMAGE_SIDE = 8
"""Smallest accepted width and height, in pixels."""

MAX_IMAGE_PIXELS = 1024 * 1024 * 1024 // 4 // 3
"""Largest accepted width × height (Pillow's default decompression-bomb limit, about 89.5
megapixels, fixed here so a changed global Pillow setting does not change what is accepted)."""

MAX_ASPECT_RATIO = 200
"""Largest accepted ratio of the longer to the shorter side (Qwen2-VL's own limit); beyond it
resizing the short side to the processor's size makes a huge image."""

MANIFEST_NAME = "manifest.jsonl"

_FINGERPRINT_TAG = b"recipe-compiler/calibration/v1\n"
_HELP = "pass --calibration with a folder of images or a .jsonl manifest"


@dataclass(frozen=True)
class CalibrationSample:
    """One calibration entry: an image and the prompt asked about it.

    Attributes:
        id: Identifier, unique within its set.
        image_path: Absolute path of the image file.
        prompt: The user prompt (at least one visible character; see :func:`prompt_problem`).
        kind: One of ``"short"``, ``"choice"``, ``"describe"``, ``"ocr"``, ``"other"``.
        split: ``"calib"`` (used to compile) or ``"heldout"`` (kept for evaluation).
        where: Where the entry came from, for messages (e.g. ``"calibration entry 3
            (/data/manifest.jsonl line 3, id 'cat-q')"``); not part of equality.
        answer: The expected answer when the manifest gives one (``"answer"``); ``recipe-eval``
            then reports exact-match accuracy. Not part of the fingerprint.
        qtype: The question type (``"qtype"``), for accuracy per type; ``None`` when not given.
    """

    id: str
    image_path: Path
    prompt: str
    kind: str
    split: str
    where: str = field(default="", compare=False, repr=False)
    answer: str | None = None
    qtype: str | None = None

    def describe(self) -> str:
        """The entry's place for messages: :attr:`where`, or its id when that is unknown.

        Returns:
            `str`: e.g. ``"calibration entry 3 (/data/manifest.jsonl line 3, id 'cat-q')"``.

        Example:

        ```python
        from recipe_compiler.calibration import load_calibration

        print(load_calibration().samples[0].describe())
        ```
        """
        return self.where or f"calibration sample {self.id!r}"


@dataclass(frozen=True)
class CalibrationSet:
    """An ordered, validated collection of calibration samples.

    Attributes:
        samples: The samples, in manifest (or file-name) order.
        source: Where they were read from (the manifest or folder path), for messages and logs.
    """

    samples: tuple[CalibrationSample, ...]
    source: str

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self):
        return iter(self.samples)

    def fingerprint(self) -> str:
        """Content hash of the set, for tying saved statistics to the data they came from.

        The SHA-256 covers, in order, each sample's id, prompt and the bytes of its image file.
        It does not depend on where the files are, so the same set gives the same fingerprint on
        every machine; changing an id, a prompt, an image or the order changes it.

        Returns:
            `str`: 64 lowercase hex digits.

        Raises:
            CalibrationDataError: an image file can no longer be read.

        Example:

        ```python
        from recipe_compiler.calibration import load_calibration

        digest = load_calibration().fingerprint()
        assert len(digest) == 64
        ```
        """
        hasher = hashlib.sha256(_FINGERPRINT_TAG)
        hasher.update(len(self.samples).to_bytes(8, "big"))
        for sample in self.samples:
            for text in (sample.id, sample.prompt):
                data = text.encode("utf-8")
                hasher.update(len(data).to_bytes(8, "big"))
                hasher.update(data)
            try:
                size = sample.image_path.stat().st_size
                hasher.update(size.to_bytes(8, "big"))
                with open(sample.image_path, "rb") as handle:
                    for chunk in iter(lambda: handle.read(1 << 20), b""):
                        hasher.update(chunk)
            except OSError as err:
                raise CalibrationDataError(
                    f"calibration sample {sample.id!r}: cannot read image {sample.image_path} "
                    f"({_reason(err)}); restore the file or reload the calibration set"
                ) from None
        return hasher.hexdigest()

    def split(self, name: str) -> "CalibrationSet":
        """The samples of one split, in order, with the same ``source``.

        Args:
            name (`str`): ``"calib"`` or ``"heldout"``.

        Returns:
            `CalibrationSet`: possibly empty when the set has no sample of that split.

        Raises:
            CalibrationDataError: ``name`` is not a known split.

        Example:

        ```python
        from recipe_compiler.calibration import load_calibration

        everything = load_calibration(split=None)
        heldout = everything.split("heldout")
        ```
        """
        if name not in SPLITS:
            raise CalibrationDataError(
                f"unknown calibration split {name!r}; use one of {', '.join(map(repr, SPLITS))}"
            )
        return CalibrationSet(
            samples=tuple(s for s in self.samples if s.split == name), source=self.source
        )


def default_calibration_path() -> Path:
    """Path of the manifest of the calibration set shipped with recipe-compiler.

    Returns:
        `Path`: absolute path of ``calibration_data/manifest.jsonl``.

    Example:

    ```python
    from recipe_compiler.calibration import default_calibration_path

    print(default_calibration_path())  # .../calibration_data/manifest.jsonl
    ```
    """
    try:
        from calibration_data import PATH
    except ImportError:  # running from a source tree that is not on sys.path
        PATH = Path(__file__).resolve().parent.parent / "calibration_data"
    return Path(PATH) / MANIFEST_NAME


def load_calibration(
    path: str | os.PathLike[str] | None = None,
    *,
    samples: int | None = None,
    split: str | None = "calib",
) -> CalibrationSet:
    """Load and fully validate a calibration set.

    Args:
        path (`str` or `os.PathLike`, *optional*):
            ``None`` for the shipped set; a ``.jsonl`` manifest; or a folder, read through its
            ``manifest.jsonl`` when present, else as every image file directly inside it
            (sorted by name) with the prompt ``"Describe the image in detail."``.
        samples (`int`, *optional*):
            Keep only the first ``samples`` entries after the split filter (at least 1).
        split (`str`, *optional*, defaults to ``"calib"``):
            Keep only entries of this split (``"calib"`` or ``"heldout"``); ``None`` keeps all.
            Entries without a ``"split"`` key count as ``"calib"``.

    Returns:
        `CalibrationSet`: the selected samples, each with an absolute image path whose image
        exists, decodes completely, is at least 8×8 and at most ``MAX_IMAGE_PIXELS`` pixels
        and at most ``MAX_ASPECT_RATIO`` times longer than wide.

    Raises:
        CalibrationDataError: the path does not exist; a manifest line is not a JSON object, has
            no usable ``image`` or ``prompt``, or repeats an id; an image is missing, a broken
            link, unreadable, empty, not an image, truncated, too small, too large or too
            elongated; the selection is empty; ``samples`` is not a positive
            integer or exceeds the entries available; ``split`` is unknown. The message is one
            line naming the entry and the fix.

    Example:

    ```python
    from recipe_compiler.calibration import load_calibration, load_image

    calib = load_calibration(samples=8)          # first 8 "calib" entries of the shipped set
    image = load_image(calib.samples[0])         # PIL RGB image
    mine = load_calibration("my_images/")        # every image in a folder, "describe" prompt
    ```
    """
    if split is not None and split not in SPLITS:
        raise CalibrationDataError(
            f"unknown calibration split {split!r}; use one of "
            f"{', '.join(map(repr, SPLITS))}, or None for all entries"
        )
    if samples is not None and (
        isinstance(samples, bool) or not isinstance(samples, int) or samples < 1
    ):
        raise CalibrationDataError(
            f"calibration samples must be a positive integer, got {samples!r}; "
            "pass a count of at least 1 or leave it unset to use every entry"
        )

    given = default_calibration_path() if path is None else Path(os.fspath(path)).expanduser()
    if not given.exists():
        raise CalibrationDataError(f"calibration data not found at {given}; {_HELP}")
    resolved = given.resolve()

    if resolved.is_dir():
        manifest = resolved / MANIFEST_NAME
        if manifest.is_file():
            entries = _read_manifest(manifest)
            source = manifest
        else:
            entries = _scan_folder(resolved)
            source = resolved
    elif resolved.suffix.lower() == ".jsonl":
        entries = _read_manifest(resolved)
        source = resolved
    else:
        raise CalibrationDataError(
            f"calibration path {resolved} is neither a folder nor a .jsonl manifest; {_HELP}"
        )

    selected = [e for e in entries if split is None or e.sample.split == split]
    what = "entries" if split is None else f"entries with split {split!r}"
    if not selected:
        if not entries:
            detail = "no entries" if source.suffix.lower() == ".jsonl" else (
                f"no image files ({' '.join(IMAGE_SUFFIXES)})"
            )
            raise CalibrationDataError(
                f"calibration data at {source} has {detail}; add images or entries, or {_HELP}"
            )
        raise CalibrationDataError(
            f"calibration data at {source} has no {what} (it has {_split_counts(entries)}); "
            "choose another split or mark entries with that split"
        )
    if samples is not None:
        if samples > len(selected):
            raise CalibrationDataError(
                f"calibration data at {source} has only {len(selected)} {what} but "
                f"samples={samples} was requested; pass samples of at most {len(selected)} "
                "or add entries"
            )
        selected = selected[:samples]

    for entry in selected:
        _check_image(entry)
    return CalibrationSet(samples=tuple(e.sample for e in selected), source=str(source))


def load_image(sample: CalibrationSample) -> Image.Image:
    """Decode a sample's image as an upright 8-bit RGB image.

    Grayscale and palette images are expanded to RGB, transparency (RGBA, LA, palette with a
    transparent colour) is composited on white, 16-bit and float grayscale is rescaled to its
    own min–max range, and the EXIF orientation tag is applied. Only the first frame of an
    animated or multi-page file is used.

    Args:
        sample (`CalibrationSample`): a sample from :func:`load_calibration`.

    Returns:
        `PIL.Image.Image`: mode ``"RGB"``, fully loaded (the file is closed).

    Raises:
        CalibrationDataError: the file is missing or cannot be decoded.

    Example:

    ```python
    from recipe_compiler.calibration import load_calibration, load_image

    image = load_image(load_calibration().samples[0])
    assert image.mode == "RGB"
    ```
    """
    where = sample.describe()
    try:
        with warnings.catch_warnings():
            # the size was checked against MAX_IMAGE_PIXELS when the set was loaded
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(sample.image_path) as image:
                image.load()
                return _to_rgb(image)
    except FileNotFoundError:
        raise CalibrationDataError(
            f"{where}: image not found at {sample.image_path}; restore the file or reload the "
            "calibration set"
        ) from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise CalibrationDataError(
            f"{where}: cannot decode image {sample.image_path} ({_reason(err)}); "
            "replace it with a valid image file"
        ) from None


# --------------------------------------------------------------------------------------------
# internals


@dataclass(frozen=True)
class _Entry:
    sample: CalibrationSample
    where: str  # "calibration entry 3 (/x/manifest.jsonl line 3, id 'cat-q')"
    image_text: str  # the image path as written by the user


def _reason(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _split_counts(entries: list[_Entry]) -> str:
    counts: dict[str, int] = {}
    for entry in entries:
        counts[entry.sample.split] = counts.get(entry.sample.split, 0) + 1
    return ", ".join(f"{count} {name!r}" for name, count in counts.items())


def _read_manifest(manifest: Path) -> list[_Entry]:
    try:
        raw = manifest.read_bytes()
    except OSError as err:
        raise CalibrationDataError(
            f"cannot read calibration manifest {manifest} ({_reason(err)}); check its permissions"
        ) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line_no = raw[: err.start].count(b"\n") + 1
        raise CalibrationDataError(
            f"calibration manifest {manifest} line {line_no}: not valid UTF-8; save the file "
            "as UTF-8"
        ) from None

    base = manifest.parent
    entries: list[_Entry] = []
    seen: dict[str, int] = {}
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        number = len(entries) + 1
        place = f"calibration entry {number} ({manifest} line {line_no}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise CalibrationDataError(
                f"{place}): not valid JSON ({err.msg} at column {err.colno}); write one JSON "
                "object per line or remove the line"
            ) from None
        if not isinstance(obj, dict):
            raise CalibrationDataError(
                f"{place}): expected a JSON object like "
                '{"image": "a.png", "prompt": "..."}, got ' + _json_type(obj) + "; fix the line "
                "or remove it"
            )

        raw_id = obj.get("id", None)
        if raw_id is None:
            sample_id = str(line_no)
        elif isinstance(raw_id, str) and raw_id.strip():
            sample_id = raw_id
        else:
            raise CalibrationDataError(
                f"{place}): \"id\" must be a non-empty string, got {raw_id!r}; fix it or drop the "
                "key to use the line number"
            )
        where = f"{place}, id {sample_id!r})"
        if sample_id in seen:
            raise CalibrationDataError(
                f"{where}: duplicate id, already used on line {seen[sample_id]}; give each entry "
                "a unique id"
            )
        seen[sample_id] = line_no

        image_text = obj.get("image")
        if not isinstance(image_text, str) or not image_text.strip():
            problem = "missing" if image_text is None else f"not a non-empty string ({image_text!r})"
            raise CalibrationDataError(
                f"{where}: \"image\" is {problem}; give the image path, relative to "
                f"{base} or absolute"
            )
        prompt = obj.get("prompt")
        problem = prompt_problem(prompt)
        if problem is not None:
            raise CalibrationDataError(
                f"{where}: \"prompt\" is {problem}; write the question or instruction for this "
                "image"
            )
        kind = obj.get("kind", "other")
        if kind not in KINDS:
            raise CalibrationDataError(
                f"{where}: unknown kind {kind!r}; use one of {', '.join(map(repr, KINDS))} or "
                "drop the key"
            )
        entry_split = obj.get("split", "calib")
        if entry_split not in SPLITS:
            raise CalibrationDataError(
                f"{where}: unknown split {entry_split!r}; use one of "
                f"{', '.join(map(repr, SPLITS))} or drop the key (defaults to 'calib')"
            )

        answer = obj.get("answer")
        if answer is not None and (not isinstance(answer, str) or not answer.strip()):
            raise CalibrationDataError(
                f"{where}: \"answer\" must be a non-empty string, got {answer!r}; fix it or drop the key"
            )
        qtype = obj.get("qtype")
        if qtype is not None and (not isinstance(qtype, str) or not qtype.strip()):
            raise CalibrationDataError(
                f"{where}: \"qtype\" must be a non-empty string, got {qtype!r}; fix it or drop the key"
            )

        image_path = Path(image_text).expanduser()
        if not image_path.is_absolute():
            image_path = base / image_path
        sample = CalibrationSample(
            id=sample_id,
            image_path=Path(os.path.abspath(image_path)),
            prompt=prompt,
            kind=kind,
            split=entry_split,
            where=where,
            answer=answer,
            qtype=qtype,
        )
        entries.append(_Entry(sample=sample, where=where, image_text=image_text))
    return entries


# Characters that show nothing on their own: controls (Cc), format characters such as U+200B
# (Cf), surrogates, unassigned code points, separators (Z*) and combining marks without a base (M*).
_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Cn", "Zs", "Zl", "Zp", "Mn", "Mc", "Me"})
# Letters and symbols that render as blank space (Hangul fillers, the blank Braille pattern).
_BLANK_CHARACTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800")


def prompt_problem(prompt: object) -> str | None:
    """Why ``prompt`` cannot be a calibration or evaluation prompt, or ``None`` when it can.

    A prompt must be a string with at least one visible character: not empty, not only
    whitespace, and not only invisible characters (controls such as U+0000, format characters
    such as U+200B, separators, combining marks without a base, blank fillers).

    Args:
        prompt: the manifest's ``"prompt"`` value (any JSON value, or ``None`` when missing).

    Returns:
        ``None``, or the problem as words that follow ``"prompt" is``: ``"missing"``,
        ``"empty"``, ``"only whitespace"``, ``"only invisible characters (U+0000 U+200B)"``,
        ``"not a string (a number)"``.

    Example:

    ```python
    from recipe_compiler.calibration import prompt_problem

    assert prompt_problem("What is shown?") is None
    assert prompt_problem("\u0000\u200b") == "only invisible characters (U+0000 U+200B)"
    ```
    """
    if prompt is None:
        return "missing"
    if not isinstance(prompt, str):
        return f"not a string ({_json_type(prompt)})"
    if prompt == "":
        return "empty"
    if prompt.isspace():
        return "only whitespace"
    if all(ch in _BLANK_CHARACTERS or unicodedata.category(ch) in _INVISIBLE_CATEGORIES for ch in prompt):
        shown = " ".join(f"U+{ord(ch):04X}" for ch in prompt[:8]) + (" ..." if len(prompt) > 8 else "")
        return f"only invisible characters ({shown})"
    return None


def _json_type(value: object) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    return "an object"


def _scan_folder(folder: Path) -> list[_Entry]:
    try:
        # Dangling symlinks are kept so that the check names them instead of skipping them.
        files = sorted(
            p for p in folder.iterdir()
            if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and not p.is_dir()
        )
    except OSError as err:
        raise CalibrationDataError(
            f"cannot list calibration folder {folder} ({_reason(err)}); check its permissions"
        ) from None
    entries = []
    for number, file in enumerate(files, start=1):
        where = f"calibration entry {number} (image file {file}, id {file.name!r})"
        sample = CalibrationSample(
            id=file.name,
            image_path=file,
            prompt=DEFAULT_PROMPT,
            kind="describe",
            split="calib",
            where=where,
        )
        entries.append(_Entry(sample=sample, where=where, image_text=file.name))
    return entries


def _check_image(entry: _Entry) -> None:
    path = entry.sample.image_path
    named = f"{entry.where}: image {entry.image_text!r} at {path}"
    if not path.exists():
        if path.is_symlink():
            raise CalibrationDataError(
                f"{named} is a broken symbolic link (to {os.readlink(path)}); fix the link or "
                "remove the entry"
            )
        raise CalibrationDataError(
            f"{entry.where}: image {entry.image_text!r} not found at {path}; fix the path or "
            "remove the entry"
        )
    if not path.is_file():
        raise CalibrationDataError(
            f"{named} is not a file; point it at an image file or remove the entry"
        )
    try:
        handle = open(path, "rb")
    except OSError as err:
        raise CalibrationDataError(
            f"{named} cannot be read ({_reason(err)}); check its permissions or remove the entry"
        ) from None
    with handle:
        if os.fstat(handle.fileno()).st_size == 0:
            raise CalibrationDataError(
                f"{named} is an empty file (0 bytes); replace it with a valid image file or "
                "remove the entry"
            )
        truncated_ok = ImageFile.LOAD_TRUNCATED_IMAGES
        try:
            # Another library may have switched this on; a truncated file must still be refused.
            ImageFile.LOAD_TRUNCATED_IMAGES = False
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(handle) as image:
                    width, height = image.size  # from the header: checked before decoding
                    _check_size(named, width, height)
                    image.load()  # full decode: catches truncated and corrupt data
        except Image.DecompressionBombError as err:
            raise CalibrationDataError(
                f"{named} is too large to decode safely ({_reason(err)}); downscale it to at "
                f"most {MAX_IMAGE_PIXELS} pixels or remove the entry"
            ) from None
        except (OSError, ValueError, SyntaxError) as err:
            # PIL raises UnidentifiedImageError (an OSError) for unknown data, OSError for
            # truncated files, and occasionally ValueError/SyntaxError for malformed headers.
            raise CalibrationDataError(
                f"{named} cannot be decoded ({_reason(err)}); replace it with a valid image "
                "file or remove the entry"
            ) from None
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = truncated_ok


def _check_size(named: str, width: int, height: int) -> None:
    if width < MIN_IMAGE_SIDE or height < MIN_IMAGE_SIDE:
        raise CalibrationDataError(
            f"{named} is {width}x{height} pixels, smaller than {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE}; "
            "use a larger image or remove the entry"
        )
    if width * height > MAX_IMAGE_PIXELS:
        raise CalibrationDataError(
            f"{named} is {width}x{height} pixels, more than the limit of {MAX_IMAGE_PIXELS} "
            "pixels; downscale it (the processor resizes it anyway) or remove the entry"
        )
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise CalibrationDataError(
            f"{named} is {width}x{height} pixels, more than {MAX_ASPECT_RATIO} times longer than "
            "wide; crop it or remove the entry"
        )


def _to_rgb(image: Image.Image) -> Image.Image:
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode == "RGB":
        return image.copy()
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode == "P" and "transparency" in image.info
    ):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in ("I", "F") or mode.startswith("I;16"):
        image = image.convert("F") if mode != "F" else image
        low, high = image.getextrema()
        if high > low:
            scale = 255.0 / (high - low)
            offset = -low * scale
            image = image.point(lambda v: v * scale + offset)  # linear form, as PIL requires
        else:
            image = image.point(lambda v: v * 0.0)
        return image.convert("L").convert("RGB")
    return image.convert("RGB")

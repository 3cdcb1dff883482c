"""Seeded scenes and one-word questions for the accuracy testbed (pure numpy + Pillow, no torch).

A scene is a 224 x 224 picture of a few outlined shapes (5 shapes, 6 colours, 2 sizes) and one
seven-segment digit tile, on a plain, gradient, noise or photographic background (crops of the CC0
photographs shipped in ``calibration_data/images``). Every question needs only a few image regions:
the one object it names, the objects of one colour, or the digit tile.

Question types (``qtype``) and answers:

=========  ==========================================  =================================
qtype      prompt                                       answers
=========  ==========================================  =================================
colour     what colour is the <shape> ?                 red green blue yellow purple orange
shape      what shape is the <colour> object ?          circle square triangle diamond cross
count      how many <colour> objects are there ?        zero one two three
exists     is there a <colour> <shape> ?                yes no
side       which side is the <shape> on ?               left right
size       what size is the <shape> ?                   small large
digit      which digit is shown ?                       0 1 2 3 4 5 6 7 8 9
=========  ==========================================  =================================

Scene ``i`` of seed ``s`` depends only on ``(s, i, difficulty)``: ``numpy.random.default_rng([s, i])``.

Example:
    >>> scene = make_scene(7, 0)
    >>> [q.qtype for q in scene.questions][:3]
    ['colour', 'colour', 'shape']
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .task import (  # noqa: F401 - re-exported
    ANSWERS, COLOUR_NAMES, COLOURS, COUNT_WORDS, DIGITS, GRID, IMAGE_SIZE, PATCH, PROMPT_WORDS, QTYPES, SHAPES, SIZES, TILE,
)

# Seven-segment digits: segments a b c d e f g (top, top-right, bottom-right, bottom, bottom-left,
# top-left, middle).
_SEGMENTS = {
    "0": "abcdef", "1": "bc", "2": "abdeg", "3": "abcdg", "4": "bcfg",
    "5": "acdfg", "6": "acdefg", "7": "abc", "8": "abcdefg", "9": "abcdfg",
}

_PHOTO_DIR = Path(__file__).resolve().parents[2] / "calibration_data" / "images"


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    x: float
    y: float
    r: float


@dataclass(frozen=True)
class Question:
    qtype: str
    prompt: str
    answer: str


@dataclass
class Scene:
    """One picture, its objects, its questions and its per-patch labels.

    Attributes:
        image: RGB ``IMAGE_SIZE`` x ``IMAGE_SIZE``.
        objects: the shapes drawn.
        digit: the digit on the tile.
        questions: one-word questions, a few per type.
        patch_labels: int64 ``[3, GRID * GRID]``: per patch (row-major) the colour (0 = none,
            1..6), the shape (0 = none, 1..5) and the digit (0 = none, 1..10) of the object or tile
            covering most of the patch (at least `MIN_COVER` pixels).
        background: ``"plain"``, ``"gradient"``, ``"noise"`` or ``"photo"``.
    """

    image: Image.Image
    objects: tuple[SceneObject, ...]
    digit: str
    questions: list[Question]
    patch_labels: np.ndarray
    background: str


@lru_cache(maxsize=1)
def _photos() -> tuple[Image.Image, ...]:
    out = []
    for path in sorted(_PHOTO_DIR.iterdir()):
        if path.suffix.lower() in (".jpg", ".jpeg", ".png"):
            with Image.open(path) as im:
                out.append(im.convert("RGB"))
    return tuple(out)


def _background(rng: np.random.Generator, difficulty: float) -> tuple[Image.Image, str]:
    u = rng.random()
    p_plain = 0.7 - 0.5 * difficulty  # curriculum: plain backgrounds first
    p_photo = 0.1 + 0.35 * difficulty
    if u < p_plain:
        colour = tuple(int(v) for v in rng.integers(60, 256, size=3))
        return Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), colour), "plain"
    if u < p_plain + p_photo:
        photos = _photos()
        photo = photos[int(rng.integers(len(photos)))]
        w, h = photo.size
        side = int(rng.integers(min(w, h) // 3, min(w, h) + 1))
        x0 = int(rng.integers(0, w - side + 1))
        y0 = int(rng.integers(0, h - side + 1))
        crop = photo.crop((x0, y0, x0 + side, y0 + side)).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
        return crop, "photo"
    if rng.random() < 0.5:
        a = rng.integers(40, 256, size=3).astype(np.float64)
        b = rng.integers(40, 256, size=3).astype(np.float64)
        t = np.linspace(0.0, 1.0, IMAGE_SIZE)[:, None, None]
        grad = a * (1 - t) + b * t
        arr = np.broadcast_to(grad, (IMAGE_SIZE, IMAGE_SIZE, 3))
        if rng.random() < 0.5:
            arr = arr.transpose(1, 0, 2)
        return Image.fromarray(np.ascontiguousarray(arr).astype(np.uint8)), "gradient"
    base = rng.integers(70, 200, size=3)
    small = rng.integers(-60, 61, size=(28, 28, 3)) + base
    img = Image.fromarray(np.clip(small, 0, 255).astype(np.uint8)).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
    return img, "noise"


def _shape_polygon(shape: str, x: float, y: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        s = r * 0.85
        return [(x - s, y - s), (x + s, y - s), (x + s, y + s), (x - s, y + s)]
    if shape == "triangle":
        return [(x, y - r), (x + r * 0.95, y + r * 0.8), (x - r * 0.95, y + r * 0.8)]
    if shape == "diamond":
        return [(x, y - r), (x + r, y), (x, y + r), (x - r, y)]
    if shape == "cross":
        a, b = r, r * 0.36
        return [(x - b, y - a), (x + b, y - a), (x + b, y - b), (x + a, y - b), (x + a, y + b), (x + b, y + b),
                (x + b, y + a), (x - b, y + a), (x - b, y + b), (x - a, y + b), (x - a, y - b), (x - b, y - b)]
    return None  # circle


def _draw_shape(draw: ImageDraw.ImageDraw, obj: SceneObject, fill, outline, width: int) -> None:
    poly = _shape_polygon(obj.shape, obj.x, obj.y, obj.r)
    if poly is None:
        box = (obj.x - obj.r, obj.y - obj.r, obj.x + obj.r, obj.y + obj.r)
        draw.ellipse(box, fill=fill, outline=outline, width=width)
    else:
        draw.polygon(poly, fill=fill, outline=outline, width=width)


def _draw_digit(draw: ImageDraw.ImageDraw, digit: str, x0: float, y0: float, s: float, ink) -> None:
    t = max(3.0, s / 8.0)
    left, right = x0 + s * 0.25, x0 + s * 0.75
    top, mid, bot = y0 + s * 0.12, y0 + s * 0.5, y0 + s * 0.88
    seg = {
        "a": (left, top, right, top), "g": (left, mid, right, mid), "d": (left, bot, right, bot),
        "f": (left, top, left, mid), "b": (right, top, right, mid),
        "e": (left, mid, left, bot), "c": (right, mid, right, bot),
    }
    for name in _SEGMENTS[digit]:
        xa, ya, xb, yb = seg[name]
        draw.rectangle((min(xa, xb) - t / 2, min(ya, yb) - t / 2, max(xa, xb) + t / 2, max(ya, yb) + t / 2), fill=ink)


def _place(rng: np.random.Generator, r: float, taken: list[tuple[float, float, float]]) -> tuple[float, float] | None:
    for _ in range(200):
        x = float(rng.uniform(r + 3, IMAGE_SIZE - r - 3))
        y = float(rng.uniform(r + 3, IMAGE_SIZE - r - 3))
        if all((x - tx) ** 2 + (y - ty) ** 2 > (r + tr + 4) ** 2 for tx, ty, tr in taken):
            return x, y
    return None


def make_scene(seed: int, index: int, difficulty: float = 1.0, per_type: int = 2) -> Scene:
    """Scene ``index`` of ``seed``.

    Args:
        seed: data-set seed (training and held-out sets use different seeds).
        index: scene number within the seed.
        difficulty: 0..1; low values give plain backgrounds, fewer objects and larger digit tiles
            (the training curriculum). Held-out sets use 1.0.
        per_type: questions asked per type (digit: one).

    Returns:
        `Scene`.
    """
    rng = np.random.default_rng([int(seed), int(index)])
    image, background = _background(rng, difficulty)
    max_objects = 3 + int(round(3 * difficulty))

    # Digit tile first (it takes a big area).
    digit = DIGITS[int(rng.integers(10))]
    tile = float(rng.integers(TILE[0] + int(6 * (1 - difficulty)), TILE[1] + int(6 * (1 - difficulty))))
    tx0 = float(rng.uniform(2, IMAGE_SIZE - tile - 2))
    ty0 = float(rng.uniform(2, IMAGE_SIZE - tile - 2))
    taken = [(tx0 + tile / 2, ty0 + tile / 2, tile * 0.72)]

    # Colours: two count targets with uniform counts first, so that count answers are balanced.
    colour_order = [COLOUR_NAMES[i] for i in rng.permutation(len(COLOUR_NAMES))]
    ca, cb = colour_order[0], colour_order[1]
    na = int(rng.integers(0, 4))
    nb = int(rng.integers(0, min(3, max_objects - na) + 1))
    colours = [ca] * na + [cb] * nb
    n_total = int(rng.integers(max(len(colours), 1), max_objects + 1))
    others = colour_order[2:]
    while len(colours) < n_total:
        colours.append(others[int(rng.integers(len(others)))])
    colours = [colours[i] for i in rng.permutation(len(colours))]

    objects: list[SceneObject] = []
    for colour in colours:
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        size = "small" if rng.random() < 0.5 else "large"
        lo, hi = SIZES[size]
        r = float(rng.uniform(lo, hi))
        spot = _place(rng, r, taken)
        if spot is None:
            continue
        taken.append((spot[0], spot[1], r))
        objects.append(SceneObject(shape, colour, size, spot[0], spot[1], r))

    # Render picture and label map.
    draw = ImageDraw.Draw(image)
    labels = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    ldraw = ImageDraw.Draw(labels)
    dark_tile = rng.random() < 0.5
    paper, ink = ((20, 20, 20), (250, 250, 250)) if dark_tile else ((250, 250, 250), (20, 20, 20))
    draw.rectangle((tx0, ty0, tx0 + tile, ty0 + tile), fill=paper, outline=(128, 128, 128), width=2)
    _draw_digit(draw, digit, tx0, ty0, tile, ink)
    ldraw.rectangle((tx0, ty0, tx0 + tile, ty0 + tile), fill=255)
    for k, obj in enumerate(objects):
        outline = (0, 0, 0) if rng.random() < 0.7 else (255, 255, 255)
        _draw_shape(draw, obj, COLOURS[obj.colour], outline, 2)
        _draw_shape(ldraw, obj, k + 1, None, 0)
    lab = _patch_owner(np.asarray(labels), len(objects))
    patch_labels = np.zeros((3, GRID * GRID), dtype=np.int64)
    for k, obj in enumerate(objects):
        hit = lab == k + 1
        patch_labels[0, hit] = COLOUR_NAMES.index(obj.colour) + 1
        patch_labels[1, hit] = SHAPES.index(obj.shape) + 1
    patch_labels[2, lab == 255] = int(digit) + 1

    questions = _questions(rng, objects, digit, per_type)
    return Scene(image, tuple(objects), digit, questions, patch_labels, background)


MIN_COVER = 25
"""Pixels (of a patch's 196) an object or the digit tile must cover for the patch to be labelled with
it; every object covers at least this much of some patch, however it falls on the grid."""


def _patch_owner(label_map: np.ndarray, n_objects: int) -> np.ndarray:
    """Per patch (row-major) the label value (object ``k + 1``, 255 for the tile, 0 for none) covering
    most of its pixels, if it covers at least `MIN_COVER` of them."""
    blocks = label_map.reshape(GRID, PATCH, GRID, PATCH).transpose(0, 2, 1, 3).reshape(GRID * GRID, PATCH * PATCH)
    values = np.asarray(list(range(1, n_objects + 1)) + [255])
    cover = (blocks[:, :, None] == values[None, None, :]).sum(1)  # [256, K + 1]
    best = cover.argmax(1)
    return np.where(cover.max(1) >= MIN_COVER, values[best], 0)


def _pick(rng: np.random.Generator, by_answer: dict[str, list[Question]], k: int) -> list[Question]:
    """Up to ``k`` questions, each with an answer drawn uniformly among the answers available."""
    out: list[Question] = []
    pool = {a: list(qs) for a, qs in by_answer.items() if qs}
    for _ in range(k):
        if not pool:
            break
        answers = sorted(pool)
        a = answers[int(rng.integers(len(answers)))]
        qs = pool[a]
        out.append(qs.pop(int(rng.integers(len(qs)))))
        if not qs:
            del pool[a]
    return out


def _questions(rng: np.random.Generator, objects: list[SceneObject], digit: str, per_type: int) -> list[Question]:
    shape_count = {s: sum(o.shape == s for o in objects) for s in SHAPES}
    colour_count = {c: sum(o.colour == c for o in objects) for c in COLOUR_NAMES}
    unique_shape = [o for o in objects if shape_count[o.shape] == 1]
    unique_colour = [o for o in objects if colour_count[o.colour] == 1]
    out: list[Question] = []

    def group(items):
        d: dict[str, list[Question]] = {}
        for q in items:
            d.setdefault(q.answer, []).append(q)
        return d

    out += _pick(rng, group(Question("colour", f"what colour is the {o.shape} ?", o.colour) for o in unique_shape), per_type)
    out += _pick(rng, group(Question("shape", f"what shape is the {o.colour} object ?", o.shape) for o in unique_colour), per_type)
    counts = [Question("count", f"how many {c} objects are there ?", COUNT_WORDS[n])
              for c, n in colour_count.items() if n < len(COUNT_WORDS)]
    out += _pick(rng, group(counts), per_type)
    present = {(o.colour, o.shape) for o in objects}
    yes = sorted(present)
    # Hard negatives: the colour or the shape is in the picture, the pair is not.
    no = sorted({(c, s) for c in COLOUR_NAMES for s in SHAPES if (c, s) not in present
                 and (colour_count[c] > 0 or shape_count[s] > 0)})
    exists = [Question("exists", f"is there a {c} {s} ?", "yes") for c, s in yes]
    if exists:
        out.append(exists[int(rng.integers(len(exists)))])
    absent = [Question("exists", f"is there a {c} {s} ?", "no") for c, s in no]
    if absent and (per_type > 1 or not exists):
        out.append(absent[int(rng.integers(len(absent)))])
    sides = [Question("side", f"which side is the {o.shape} on ?", "left" if o.x < IMAGE_SIZE / 2 else "right")
             for o in unique_shape if abs(o.x - IMAGE_SIZE / 2) > 12]
    out += _pick(rng, group(sides), per_type)
    out += _pick(rng, group(Question("size", f"what size is the {o.shape} ?", o.size) for o in unique_shape), per_type)
    out.append(Question("digit", "which digit is shown ?", digit))
    return out

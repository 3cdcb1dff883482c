"""The testbed task's vocabulary and geometry (constants only: no Pillow, no torch).

See :mod:`recipe_compiler.testbed.scenes` for the scenes and questions.
"""
from __future__ import annotations

IMAGE_SIZE = 224
PATCH = 14
GRID = IMAGE_SIZE // PATCH  # 16 x 16 = 256 visual tokens

COLOURS = {
    "red": (222, 36, 36),
    "green": (34, 168, 52),
    "blue": (36, 78, 232),
    "yellow": (244, 222, 32),
    "purple": (150, 44, 196),
    "orange": (250, 138, 20),
}
COLOUR_NAMES = tuple(COLOURS)
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
# Radius ranges in pixels. Objects span 1-3 patches (14 px), so nearly every patch of an object holds
# part of its outline and its shape can be read from the patch and its neighbours.
SIZES = {"small": (8, 11), "large": (15, 19)}
TILE = (38, 48)  # digit tile side in pixels (held-out difficulty); up to 6 px larger early in the curriculum
COUNT_WORDS = ("zero", "one", "two", "three")
DIGITS = tuple(str(d) for d in range(10))

QTYPES = ("colour", "shape", "count", "exists", "side", "size", "digit")
ANSWERS = {
    "colour": COLOUR_NAMES,
    "shape": SHAPES,
    "count": COUNT_WORDS,
    "exists": ("yes", "no"),
    "side": ("left", "right"),
    "size": tuple(SIZES),
    "digit": DIGITS,
}
PROMPT_WORDS = ("what", "colour", "is", "the", "shape", "object", "how", "many", "objects", "are",
                "there", "a", "which", "side", "on", "size", "digit", "shown", "?")


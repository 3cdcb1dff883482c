"""The shared family table: every built-in tiny model the production matrix (and other suites) runs.

A new family joins every table-driven suite by one :class:`FamilyCase` line in :data:`FAMILIES`.
What a case holds is only what a test needs to *drive* the model the way users do (how one image
is written in a prompt, two image sizes that give different token counts) and an independent
oracle of the family's view geometry (to check the counts a pre-LLM stage must keep); everything
else — which stages it supports, its layers, its visual tokens — is asked of the product.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import pytest


def _one_view(n_tokens: int, config: Any) -> list[int]:
    return [n_tokens]


def _next_views(n_tokens: int, config: Any) -> list[int]:
    """LLaVA-NeXT: the base crop's s×s tokens, then the rest (the unpadded high-resolution grid)."""
    side = int(config.vision_config.image_size) // int(config.vision_config.patch_size)
    return [side * side, n_tokens - side * side] if n_tokens > side * side else [n_tokens]


def _tile_views(n_tokens: int, config: Any) -> list[int]:
    """InternVL: one view per tile, (patches per side · downsample_ratio)² tokens each."""
    side = int(config.vision_config.image_size[0]) // int(config.vision_config.patch_size[0])
    per_tile = int(side * config.downsample_ratio) ** 2
    return [per_tile] * (n_tokens // per_tile)


@dataclass(frozen=True)
class FamilyCase:
    """One built-in tiny model as the shared suites drive it.

    Attributes:
        name: the built-in's name (``recipe_compiler.load_model(name)`` where it is a registry alias).
        image_marker: how one image is written in the family's prompt template.
        image_sizes: (width, height) of two images that give different visual-token counts
            (equal sizes where the family resizes every image to one size).
        view_sizes: ``view_sizes(prunable_tokens_of_one_image, config)``: the sizes of the views a
            pre-LLM stage ranks separately (an independent oracle of the family's geometry).
        build: builds the model (default: ``load_model(name)``).
        slow: mark the family's matrix cells ``slow``.
    """

    name: str
    image_marker: str
    image_sizes: tuple[tuple[int, int], tuple[int, int]]
    view_sizes: Callable[[int, Any], list[int]] = _one_view
    build: Callable[..., Any] | None = None
    slow: bool = False

    def load(self, attn_implementation: str = "sdpa") -> Any:
        return _load(self, attn_implementation)

    def __str__(self) -> str:
        return self.name


@functools.lru_cache(maxsize=None)
def _load(case: FamilyCase, attn_implementation: str) -> Any:
    if case.build is not None:
        return case.build(seed=0, attn_implementation=attn_implementation)
    from recipe_compiler.models import load_model

    return load_model(case.name, seed=0, attn_implementation=attn_implementation)


_QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"

FAMILIES: list[FamilyCase] = [
    FamilyCase("tiny-llava", "<image>", ((96, 96), (120, 72))),
    FamilyCase("tiny-llava-next", "<image>", ((64, 64), (90, 60)), view_sizes=_next_views),
    FamilyCase("tiny-qwen2-vl", _QWEN_IMAGE, ((64, 64), (88, 56))),
    FamilyCase("tiny-qwen2.5-vl", _QWEN_IMAGE, ((64, 64), (88, 56))),
    FamilyCase("tiny-internvl", "<IMG_CONTEXT>", ((128, 128), (192, 64)), view_sizes=_tile_views),
    FamilyCase("tiny-llava-onevision", "<image>", ((64, 64), (160, 96)), view_sizes=_next_views),
    FamilyCase("tiny-qwen3-vl", _QWEN_IMAGE, ((64, 64), (88, 56))),
    FamilyCase("tiny-qwen3.5", _QWEN_IMAGE, ((64, 64), (88, 56))),
    FamilyCase("tiny-gemma3", "<start_of_image>", ((128, 128), (160, 96))),  # every image is resized to the square input
]


def family_params() -> list:
    """``pytest.param`` per family (marked ``slow`` where the case says so), for ``parametrize``."""
    return [pytest.param(case, id=case.name, marks=[pytest.mark.slow] if case.slow else []) for case in FAMILIES]

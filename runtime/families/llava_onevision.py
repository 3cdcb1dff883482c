"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``, ``model_type == "llava_onevision"``): anyres_max_9.

LLaVA-NeXT's anyres layout (:mod:`runtime.families.llava_next`: a base crop, then the unpadded
high-resolution grid row by row, each row followed by one ``image_newline`` token, which is never
pruned) with three differences, all in ``LlavaOnevisionModel.pack_image_features``:

* **anyres_max_9**: when the unpadded grid holds more than ``1.1² · 9`` crops' worth of tokens it
  is downscaled **bilinearly** by ``ratio = sqrt(rows·cols / (9·s²))`` to
  ``(rows // ratio) × (cols // ratio)``, so a high-resolution token is no longer one encoder patch;
* a prompt with several images (``batch_num_images > 1``) encodes each image as its base crop only,
  followed by one newline;
* the vision tower is SigLIP: no CLS token, strategy ``full`` (one token per patch).

The geometry is computed once, by running the model's own ``pack_image_features`` on dummies
(:func:`packed_layout`), and read by the runtime (newlines, views), the FLOPs model (crops per
image) and the pictures. Pre-LLM views are NeXT's: per image the base view then the high-res view.
Vision signals: ``"attention"`` is the attention each patch *receives* at the feature layer (mean
over heads and query rows, within its crop), and the high-res view's is packed exactly like the
features (unpadded, bilinearly downscaled) with :func:`packed_signal`; ``"features"`` (CLS
similarity, so cls-inflection) is refused: SigLIP has no CLS token.
"""
from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Any, Callable

import torch

from ..errors import StageCannotRun
from .base import Encoded, Family, Signal, View, register_family
from .llava_next import LlavaNextFamily


def layout_key(config: Any) -> tuple:
    """``(pinpoints, crop, patch, vision_aspect_ratio)`` of a OneVision config, hashable."""
    vision = config.vision_config
    pinpoints = tuple(tuple(int(x) for x in p) for p in config.image_grid_pinpoints)
    return pinpoints, int(vision.image_size), int(vision.patch_size), str(getattr(config, "vision_aspect_ratio", "anyres_max_9"))


def _crops(pinpoints: tuple, crop: int, height: int, width: int, multi: bool) -> int:
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    return 1 if multi else int(image_size_to_num_patches([height, width], [list(p) for p in pinpoints], crop))


def _pack(key: tuple, size: tuple[int, int], multi: bool, values: torch.Tensor) -> torch.Tensor:
    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

    pinpoints, crop, patch, aspect = key
    owner = SimpleNamespace(config=SimpleNamespace(vision_config=SimpleNamespace(image_size=crop, patch_size=patch),
                                                   image_grid_pinpoints=[list(p) for p in pinpoints]))
    newline = torch.full((1,), float("nan"), dtype=values.dtype, device=values.device)
    packed, _ = LlavaOnevisionModel.pack_image_features(owner, [values[..., None]], [list(size)], image_newline=newline,
                                                        vision_aspect_ratio=aspect)
    return packed[0][:, 0]


@functools.lru_cache(maxsize=4096)
def _layout(key: tuple, height: int, width: int, multi: bool) -> tuple[torch.Tensor, int]:
    crops = _crops(key[0], key[1], height, width, multi)
    patches = (key[1] // key[2]) ** 2
    packed = _pack(key, (height, width), multi, torch.ones(crops, patches, dtype=torch.float64))
    return torch.isnan(packed), crops


def packed_layout(config: Any, height: int, width: int, multi: bool = False) -> tuple[torch.Tensor, int]:
    """One packed OneVision image: bool over its placeholders (True at newlines), and its crop count.

    Args:
        config: a ``LlavaOnevisionConfig``.
        height, width: the original image size (``image_sizes``).
        multi: the image is one of several in its prompt (``batch_num_images > 1``): base crop only.

    Example:
        >>> newline, crops = packed_layout(ov.model.config, 96, 160)   # doctest: +SKIP
        >>> int((~newline).sum()), int(newline.sum()), crops
        (604, 18, 16)
    """
    return _layout(layout_key(config), int(height), int(width), bool(multi))


def packed_signal(config: Any, size: tuple[int, int], multi: bool, values: torch.Tensor) -> torch.Tensor:
    """A per-patch signal ``values`` ``(crops, P)`` of one image, packed as its features are: per
    placeholder (unpadded, bilinearly downscaled where the model downscales), NaN at newlines."""
    return _pack(layout_key(config), (int(size[0]), int(size[1])), bool(multi), values.double())


def reference_size(config: Any) -> tuple[int, int]:
    """The reference image: the largest-area pinpoint (the first on a tie), as for LLaVA-NeXT."""
    return max(layout_key(config)[0], key=lambda p: p[0] * p[1])


def image_crops(config: Any, height: int, width: int, multi: bool = False) -> int:
    """Crops the vision encoder runs for one image (1 for an image among several in its prompt)."""
    return packed_layout(config, height, width, multi)[1]


def _multi_flags(sizes: list, batch_num_images: Any) -> list[bool]:
    if batch_num_images is None:
        return [False] * len(sizes)
    counts = batch_num_images.tolist() if hasattr(batch_num_images, "tolist") else list(batch_num_images)
    return [int(n) != 1 for n in counts for _ in range(int(n))]


@register_family("llava_onevision")
class LlavaOnevisionFamily(LlavaNextFamily):
    """LLaVA-OneVision: LLaVA-NeXT's views with anyres_max_9 downscaling and a SigLIP tower (no CLS)."""

    top_fields = LlavaNextFamily.top_fields + ("vision_aspect_ratio",)
    signals = {"attention": None, "features": "its SigLIP vision encoder has no CLS token",
               "encoder_patches": "its high-resolution features are bilinearly downscaled before they become tokens"}
    vllm_architecture = None
    vllm_refusal = ("LLaVA-OneVision is not served by the vLLM plugin: it has no model class for OneVision's "
                    "anyres_max_9 packing, and none is tested; serve it with the HF runtime (runtime.load(recipe).apply(model))")

    def reference_visual_tokens(self, config: Any) -> int:
        """Prunable tokens of the reference image (:func:`reference_size`; newlines excluded): 729 base +
        81×81 downscaled grid = 7290 for the released checkpoints (2304×2304 px)."""
        newline, _ = packed_layout(config, *reference_size(config))
        return int((~newline).sum())

    def newline_masks(self, config: Any, sizes: list, base_kwargs: dict) -> list[torch.Tensor]:
        flags = _multi_flags(sizes, base_kwargs.get("batch_num_images"))
        return [packed_layout(config, int(h), int(w), multi)[0] for (h, w), multi in zip(sizes, flags)]

    # ------------------------------------------------------------------ pre-LLM stages
    def default_feature_layer(self, model: Any) -> Any:
        return getattr(model.config, "vision_feature_layer", -1)

    def stage_precondition(self, model: Any) -> str | None:
        if getattr(model.config, "vision_feature_select_strategy", "full") != "full":
            return "pre-LLM stages need vision_feature_select_strategy 'full' (SigLIP has no CLS: one token per patch)"
        return Family.stage_precondition(self, model)  # LLaVA's 'default' rule is for CLIP's CLS

    def signal_hooks(self, model: Any, capture: set, feature_layer: int | None, record: Callable[[str, torch.Tensor], None]) -> list:
        return siglip_signal_hooks(self, model, capture, feature_layer, record)

    def image_layout(self, arguments: dict) -> list | None:
        """Each image's ``(height, width, multi)``: its size and whether its prompt holds several images."""
        sizes = super().image_layout(arguments)
        if sizes is None:
            return None
        return [(h, w, multi) for (h, w), multi in zip(sizes, _multi_flags(sizes, arguments.get("batch_num_images")))]

    def views(self, model: Any, roles: Any, row: int, positions: torch.Tensor, encoded: Encoded, index: int,
              signal: Signal) -> list[View]:
        """Per image the base view, then the high-res view (if encoded); signals indexed by crop (``(crops, P)``)."""
        config = model.config
        side = self.crop_side(config)
        newline = ~roles.visual[row, positions]
        attention = signal("attention")
        layout = encoded.layout
        packed = None
        if layout is not None and index < len(layout):
            h, w, multi = layout[index]
            expected, crops = packed_layout(config, h, w, multi)
            if expected.numel() != positions.numel() or not torch.equal(expected.to(newline.device), newline):
                raise StageCannotRun(f"the LLaVA-OneVision layout of a {(h, w)} image does not match its {positions.numel()} placeholders")
            if attention is not None:
                first = sum(packed_layout(config, *item)[1] for item in layout[:index])
                packed = packed_signal(config, (h, w), multi, attention[first:first + crops].float()).float()
        elif attention is not None:
            raise StageCannotRun("no image_sizes reached get_image_features; LLaVA-OneVision crops cannot be mapped to tokens")
        prunable = torch.nonzero(~newline).flatten()
        base, rest = prunable[: side * side], prunable[side * side:]
        parts = [(base, (side, side))]
        if rest.numel():
            lines = int(newline[int(base[-1]) + 1:].sum())
            parts.append((rest, (lines, rest.numel() // lines) if lines and rest.numel() % lines == 0 else None))
        out = []
        for part, grid in parts:
            view = View(row, positions[part], grid)
            if packed is not None:
                view.attention = packed[part.cpu()].to(positions.device)
            out.append(view)
        return out


def siglip_signal_hooks(family: Family, model: Any, capture: set, feature_layer: int | None,
                        record: Callable[[str, torch.Tensor], None]) -> list:
    """:meth:`Family.signal_hooks` of a SigLIP tower (no CLS): ``"attention"`` is :func:`received_attention`
    at the feature layer, read from the input of that layer's ``self_attn``."""
    if "attention" not in capture:
        return []

    def on_attention_input(module: Any, args: tuple, kwargs: dict) -> None:
        record("attention", received_attention(module, args[0] if args else kwargs["hidden_states"]))

    attn = family.vision_layers(model)[family.feature_encoder_layer(model, feature_layer)].self_attn
    return [attn.register_forward_pre_hook(on_attention_input, with_kwargs=True)]


def received_attention(module: Any, x: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """(N, P): the mean over heads and query rows of the attention each patch receives in one SigLIP
    attention module, per crop, from the module's input ``x`` (N, P, D) (also Gemma 3's tower)."""
    with torch.no_grad():
        n, t, _ = x.shape
        heads, dim = module.num_heads, module.head_dim
        out = torch.empty(n, t, dtype=torch.float32, device=x.device)
        for crop in range(n):  # one crop at a time bounds the memory to H·T² (37 crops at 384 px)
            q = module.q_proj(x[crop]).float().view(t, heads, dim).transpose(0, 1)
            k = module.k_proj(x[crop]).float().view(t, heads, dim).transpose(0, 1)
            if t <= block:
                out[crop] = torch.softmax((q @ k.transpose(-1, -2)) * module.scale, dim=-1).mean(dim=(0, 1))
                continue
            total = torch.zeros(t, dtype=torch.float32, device=x.device)
            for q0 in range(0, t, block):  # and query blocks to H·block·T (Gemma 3: 4096 patches)
                total += torch.softmax((q[:, q0:q0 + block] @ k.transpose(-1, -2)) * module.scale, dim=-1).sum(dim=(0, 1))
            out[crop] = total / (heads * t)
        return out

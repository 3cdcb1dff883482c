"""The pre-LLM stage at run time: drop visual tokens on entry to decoder layer 0.

A stage is a selection on entry to layer 0 (the "K = 0 pruner"), so it needs nothing beyond the
pruner's own mechanism and works unchanged under ``generate()``. Every method works per **view**
(a patch grid whose tokens are ranked together): what each method reads:

* ``g-prune``: the projected image features, which are exactly the language model's input
  embeddings at the image positions (:meth:`Policy.on_inputs`);
* ``fopru-rank`` / ``fopru-row``: the vision encoder's attention at the FoPru feature layer
  (``params["feature_layer"]``, HF ``vision_feature_layer`` convention; default the model's),
  recomputed from the input of that layer's attention module (a forward pre-hook): the CLS row
  averaged over heads for CLIP; for Qwen2-VL's encoder (no CLS) the mean over heads and query
  rows of the attention each patch receives, averaged over each ``2×2`` merge group;
* ``cls-inflection``: the CLS and patch hidden states the model's feature layer outputs (a
  forward hook); the knee detector is ``params["inflection_detector"]``.

Families (``model_type``):

* ``llava`` (strategy ``default``): one view per image, its ``s×s`` grid.
* ``llava_next``: per image, the base view (crop 0, ``s×s``) and the high-resolution view (the
  unpadded grid of the other crops, rows delimited by ``image_newline`` tokens). Newlines are never
  prunable and always survive. Encoder patches are mapped to prompt positions with the model's
  own ``pack_image_features`` on index-coded dummies, so unpadding is followed exactly; that needs
  ``image_sizes``, recorded by a transparent wrapper around ``get_image_features`` (generate()
  drops them from the prefill call).
* ``qwen2_vl``: one view per image, the merged ``(h/2)×(w/2)`` grid; ``cls-inflection`` is refused
  (no CLS token). ``qwen2_5_vl``: ``g-prune`` only (its encoder reorders patches into windows).

Pure torch; the scorers are in :mod:`runtime.prellm`.
"""
from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch

from . import prellm
from .adapters import adapter_for
from .errors import StageCannotRun
from .state import PerThread

FIXED_RATIO_METHODS = ("g-prune", "fopru-rank", "fopru-row")
STAGE_METHODS = (*FIXED_RATIO_METHODS, "cls-inflection")
GPRUNE_DEFAULTS = {"threshold": 0.5, "temperature": 0.03, "steps": 5}
DETECTORS = prellm.DETECTORS
_SUPPORT = {
    "llava": STAGE_METHODS,
    "llava_next": STAGE_METHODS,
    "qwen2_vl": FIXED_RATIO_METHODS,
    "qwen2_5_vl": ("g-prune",),
}
_WHY_NOT = {
    ("qwen2_vl", "cls-inflection"): "its vision encoder has no CLS token",
    ("qwen2_5_vl", "cls-inflection"): "its vision encoder has no CLS token",
    ("qwen2_5_vl", "fopru-rank"): "its encoder attends within reordered windows, so patch attention is not supported",
    ("qwen2_5_vl", "fopru-row"): "its encoder attends within reordered windows, so patch attention is not supported",
}


def stage_count(keep_ratio: float, n: int) -> int:
    """Tokens a fixed-ratio stage keeps of a view's ``n``: ``round_half_up(keep_ratio · n)``."""
    return min(int(n), max(0, int(math.floor(float(keep_ratio) * int(n) + 0.5))))


def _family(model: Any) -> str:
    return model.config.model_type


def _base(model: Any) -> Any:
    return model if hasattr(model, "language_model") else model.model


def vision_layers(model: Any) -> torch.nn.ModuleList:
    """The vision encoder's layers (CLIP ``encoder.layers``, Qwen-VL ``visual.blocks``).

    Args:
        model: a VLM of a supported family (or its base model).

    Returns:
        The ``ModuleList`` of encoder layers.

    Example:
        >>> len(vision_layers(tiny.model))   # doctest: +SKIP
        2
    """
    base = _base(model)
    if _family(model).startswith("qwen2"):
        return base.visual.blocks
    tower = base.vision_tower
    encoder = getattr(tower, "encoder", None) or getattr(getattr(tower, "vision_model", None), "encoder", None)
    if encoder is None:
        raise ValueError(f"{type(tower).__name__} has no .encoder.layers; pre-LLM stages support CLIP-style encoders")
    return encoder.layers


def resolve_feature_layer(model: Any, index: int | None = None, name: str = "feature layer") -> int:
    """A vision feature layer as a non-negative ``hidden_states`` index in ``[1, depth]``.

    Same convention as HF ``vision_feature_layer``: ``hidden_states[0]`` is the embeddings,
    ``i >= 1`` the output of encoder layer ``i``, negative counts from the end (``-1`` = last).

    Args:
        model: a supported VLM.
        index: the layer; ``None`` means the model's own (``vision_feature_layer``; Qwen-VL: -1).
        name: what to call the value in the error (e.g. the CLI option).

    Returns:
        ``hidden_states`` index; the attention read is that of encoder layer ``index − 1`` (0-based).

    Raises:
        ValueError: not an integer, or out of range for the encoder's depth (names both).

    Example:
        >>> resolve_feature_layer(tiny.model, -2)   # doctest: +SKIP
        1
    """
    if index is None:
        index = -1 if _family(model).startswith("qwen2") else getattr(model.config, "vision_feature_layer", -2)
        if not isinstance(index, int):
            raise ValueError(f"vision_feature_layer {index!r} is not a single layer; pre-LLM stages need one")
    if isinstance(index, bool) or not isinstance(index, int):
        raise ValueError(f"{name} {index!r} must be an integer (HF vision_feature_layer convention)")
    depth = len(vision_layers(model))
    hidden = index if index >= 0 else depth + 1 + index
    if not 1 <= hidden <= depth:
        raise ValueError(f"{name} {index} is out of range for this {depth}-layer vision encoder; use 1..{depth} or -{depth}..-1")
    return hidden


def feature_encoder_layer(model: Any, index: int | None = None) -> int:
    """0-based index of the encoder layer whose output is feature layer ``index`` (default: the model's).

    Args:
        model: a supported VLM.
        index: as for :func:`resolve_feature_layer`.

    Returns:
        ``resolve_feature_layer(model, index) − 1``.

    Example:
        >>> feature_encoder_layer(tiny.model, -1)   # doctest: +SKIP
        1
    """
    return resolve_feature_layer(model, index) - 1


def unsupported_reason(model: Any, method: str) -> str | None:
    """Why ``model`` cannot run pre-LLM ``method`` (one line naming the alternatives), or ``None``.

    Args:
        model: any VLM.
        method: one of :data:`STAGE_METHODS`.

    Returns:
        The reason, or ``None`` when the stage is supported.

    Example:
        >>> unsupported_reason(qwen.model, "cls-inflection")   # doctest: +SKIP
        "pre-LLM stage 'cls-inflection' is not supported on model_type 'qwen2_vl' (its vision encoder has no CLS token); use g-prune, fopru-rank or fopru-row"
    """
    family = _family(model)
    if family not in _SUPPORT:
        return f"pre-LLM stages support model types {', '.join(_SUPPORT)}, not {family!r}"
    if method not in _SUPPORT[family]:
        why = _WHY_NOT.get((family, method), "it is not implemented for this family")
        others = _SUPPORT[family]
        choices = others[0] if len(others) == 1 else f"{', '.join(others[:-1])} or {others[-1]}"
        return f"pre-LLM stage {method!r} is not supported on model_type {family!r} ({why}); use {choices}"
    if not family.startswith("qwen2") and getattr(model.config, "vision_feature_select_strategy", "default") != "default":
        return "pre-LLM stages need vision_feature_select_strategy 'default' (one token per patch)"
    try:
        resolve_feature_layer(model)
    except (ValueError, AttributeError) as exc:
        return str(exc)
    return None


def supported_methods(model: Any) -> tuple[str, ...]:
    """The pre-LLM methods ``model`` can run (empty for an unsupported family).

    Example:
        >>> supported_methods(qwen.model)   # doctest: +SKIP
        ('g-prune', 'fopru-rank', 'fopru-row')
    """
    return tuple(m for m in STAGE_METHODS if unsupported_reason(model, m) is None)


def check_supported(model: Any, method: str | None = None) -> None:
    """Raise ValueError saying why ``model`` cannot run ``method`` (default: any pre-LLM stage).

    Example:
        >>> check_supported(tiny.model, "fopru-row")   # doctest: +SKIP
    """
    methods = (method,) if method is not None else STAGE_METHODS
    reasons = [unsupported_reason(model, m) for m in methods]
    if all(reasons):
        raise ValueError(reasons[0])


def view_keep(method: str, scores: torch.Tensor, keep_ratio: float | None, grid: tuple[int, int] | None,
              detector: str = "kneedle") -> torch.Tensor:
    """The survivors of one view from its per-token scores (shared by the runtime and the compiler).

    Args:
        method: a :data:`STAGE_METHODS` entry; ``g-prune`` takes :func:`prellm.gprune_scores`,
            FoPru the significance, ``cls-inflection`` the CLS similarity.
        scores: (n,) in the view's row-major order.
        keep_ratio: fixed-ratio methods: the kept fraction (``stage_count``).
        grid: (rows, cols) of the view (``fopru-row``).
        detector: ``cls-inflection``'s knee detector.

    Returns:
        (n,) bool mask (original order).

    Example:
        >>> view_keep("fopru-rank", torch.tensor([0.1, 0.5, 0.2, 0.4]), 0.5, (2, 2)).tolist()
        [False, True, False, True]
    """
    n = scores.shape[0]
    if method == "cls-inflection":
        return prellm.inflection_keep(scores, detector)
    k = stage_count(keep_ratio, n)
    if method == "fopru-row":
        if grid is None or grid[0] * grid[1] != n:
            raise RuntimeError(f"fopru-row needs the view's patch grid; got {grid} for {n} tokens")
        return prellm.fopru_row_keep(scores, grid, k)
    return prellm._topk_mask(scores, k)


@dataclass
class View:
    """One ranked unit: prompt ``positions`` (row ``row``) of its prunable tokens in grid order."""

    row: int
    positions: torch.Tensor
    grid: tuple[int, int] | None
    attention: torch.Tensor | None = None  # (n,) FoPru significance
    clssim: torch.Tensor | None = None  # (n,) cosine to the CLS token


class _Restore:
    """Installs an instance-attribute wrapper; ``remove()`` puts back what was there (same API as a hook handle)."""

    def __init__(self, owner: Any, name: str, wrapper: Any) -> None:
        self.owner, self.name, self.wrapper = owner, name, wrapper
        self._missing = object()
        self.previous = owner.__dict__.get(name, self._missing)  # another patch already there is put back
        setattr(owner, name, wrapper)

    def remove(self) -> None:
        if self.owner.__dict__.get(self.name) is not self.wrapper:
            return
        if self.previous is self._missing:
            del self.owner.__dict__[self.name]
        else:
            self.owner.__dict__[self.name] = self.previous


@functools.lru_cache(maxsize=1024)
def _next_sources(pinpoints: tuple, crop: int, patch: int, size: tuple[int, int]) -> tuple[torch.Tensor, int]:
    """One packed LLaVA-NeXT image: per placeholder its encoder patch ``crop·P + p`` or -1 (newline),
    and the image's crop count (unpadding may drop whole crops, so it is not ``max // P + 1``).

    Runs transformers' own ``pack_image_features`` on index-coded dummies, so the unpadding is
    exactly the model's.
    """
    from types import SimpleNamespace

    from transformers.models.llava_next.modeling_llava_next import LlavaNextModel, image_size_to_num_patches

    grid = [list(p) for p in pinpoints]
    crops = image_size_to_num_patches(list(size), grid, crop)
    patches = (crop // patch) ** 2
    owner = SimpleNamespace(config=SimpleNamespace(vision_config=SimpleNamespace(image_size=crop, patch_size=patch), image_grid_pinpoints=grid))
    coded = torch.arange(crops * patches, dtype=torch.float64).view(crops, patches, 1)
    packed, _ = LlavaNextModel.pack_image_features(owner, [coded], [list(size)], "default", image_newline=torch.tensor([-1.0], dtype=torch.float64))
    return packed[0][:, 0].round().long(), crops


@dataclass
class _Encoded:
    """One ``get_image_features`` call: the per-image feature blocks it returned, with its signals.

    ``blocks`` are what the model scatters into the image placeholders, image by image; the
    signals were captured from the vision encoder during the same call and are indexed by image
    (LLaVA), crop (LLaVA-NeXT) or patch (Qwen-VL) in encoding order.
    """

    blocks: list
    attention: torch.Tensor | None = None  # LLaVA (images, P); NeXT (crops, P); Qwen-VL (patches,)
    features: torch.Tensor | None = None  # LLaVA (images, 1 + P, D); NeXT (crops, 1 + P, D)
    sizes: list | None = None  # NeXT: (height, width) of each image
    grids: list | None = None  # Qwen-VL: (t, h, w) of each image


_KEEP_ENCODED = 4  # encodings remembered per thread: generate() encodes once, then prefills


def _blocks(pooled: Any) -> list:
    if isinstance(pooled, torch.Tensor):
        return list(pooled) if pooled.dim() == 3 else [pooled]
    return list(pooled)


class PreLLMStage:
    """One pre-LLM method with its parameters; hooks the vision encoder and picks layer-0 survivors.

    Args:
        method: one of :data:`STAGE_METHODS`.
        keep_ratio: fraction of each view's tokens kept (fixed-ratio methods; ignored by
            ``cls-inflection``, whose count is the knee of each view's curve).
        params: G-Prune ``threshold``, ``temperature``, ``steps``; FoPru ``feature_layer``;
            ``inflection_detector`` (others are ignored).
        capture: which vision signals to record: ``{"attention", "features"}`` (default: what
            ``method`` needs; the calibration pass asks for all the model supports).

    Images are matched to their placeholders the way the model itself fills them: the feature
    blocks the base model scatters (``generate`` hands them over in ``mm_encoder_outputs``, expanded
    for beam search; a plain forward encodes them itself) split the row-major run of placeholders,
    and each block is traced back to the ``get_image_features`` call that produced it, whose vision
    signals it then reads. So adjacent images, several images per row, beam search and any batch
    layout map exactly. What the hooks capture for the request in flight is kept per thread
    (:mod:`runtime.state`).
    """

    _attention = PerThread(list)  # per vision forward of the current encode: significance
    _features = PerThread(list)  # per vision forward of the current encode: (n, 1 + P, D)
    _patch_grids = PerThread(list)  # Qwen-VL: grid_thw per vision forward of the current encode
    _encoded = PerThread(list)  # recent _Encoded, oldest first
    _encode_count = PerThread(lambda: 0)
    _forward_mark = PerThread(lambda: 0)  # _encode_count when the prefill's base forward began
    _scattered = PerThread()  # the blocks mm_encoder_outputs carried into this forward, if any
    _ids = PerThread()
    _embeds = PerThread()

    def __init__(self, method: str, keep_ratio: float = 1.0, params: dict | None = None, capture: set | None = None) -> None:
        if method not in STAGE_METHODS:
            raise ValueError(f"unknown pre-LLM method {method!r}; choose one of {', '.join(STAGE_METHODS)}")
        params = dict(params or {})
        self.method = method
        self.keep_ratio = float(keep_ratio)
        self.params = {**GPRUNE_DEFAULTS, **{k: v for k, v in params.items() if k in GPRUNE_DEFAULTS}}
        self.feature_layer = params.get("feature_layer")
        self.detector = params.get("inflection_detector", "kneedle")
        if self.detector not in DETECTORS:
            raise ValueError(f"inflection detector {self.detector!r} is unknown; choose one of {', '.join(DETECTORS)}")
        if capture is None:
            capture = {"attention"} if method.startswith("fopru") else {"features"} if method == "cls-inflection" else set()
        self.capture = set(capture)
        self._family = "llava"
        self._model: Any = None

    def __deepcopy__(self, memo: dict) -> "PreLLMStage":
        return self  # shared with the handle that owns it (see PruningHandle._deepcopy_model)

    # ------------------------------------------------------------------ hooks
    def attach(self, model: Any) -> list:
        """Install the hooks this stage needs; returns removable handles.

        Raises:
            ValueError: the model cannot run this method (one line, with the alternatives).
        """
        check_supported(model, self.method)
        for signal, method in (("attention", "fopru-rank"), ("features", "cls-inflection")):
            if signal in self.capture and unsupported_reason(model, method):
                raise ValueError(unsupported_reason(model, method))
        self._family = _family(model)
        self._model = model
        self._image_token_id = int(adapter_for(model).image_token_id(model))
        base = _base(model)
        hooks = [base.register_forward_pre_hook(self._on_base, with_kwargs=True)]
        original = base.get_image_features
        signature = inspect.signature(original)

        @functools.wraps(original)  # generate() reads the signature through __wrapped__
        def get_image_features(*args: Any, **kwargs: Any) -> Any:
            self._attention, self._features, self._patch_grids = [], [], []
            output = original(*args, **kwargs)
            self._remember(output, signature.bind_partial(*args, **kwargs).arguments)
            return output

        hooks.append(_Restore(base, "get_image_features", get_image_features))
        if not self.capture:
            return hooks
        layers = vision_layers(model)
        if self._family.startswith("qwen2"):
            hooks.append(base.visual.register_forward_pre_hook(self._on_qwen_visual, with_kwargs=True))
            if "attention" in self.capture:
                attn = layers[feature_encoder_layer(model, self.feature_layer)].attn
                hooks.append(attn.register_forward_pre_hook(self._on_qwen_attention, with_kwargs=True))
            return hooks
        if "attention" in self.capture:
            attn = layers[feature_encoder_layer(model, self.feature_layer)].self_attn
            hooks.append(attn.register_forward_pre_hook(self._on_attention_input, with_kwargs=True))
        if "features" in self.capture:
            hooks.append(layers[feature_encoder_layer(model)].register_forward_hook(self._on_layer_output))
        return hooks

    def _remember(self, output: Any, arguments: dict) -> None:
        pooled = getattr(output, "pooler_output", None)
        if pooled is None and isinstance(output, (tuple, list)) and output:
            pooled = output[0]
        if pooled is None:
            return
        sizes = arguments.get("image_sizes")
        grids = arguments.get("image_grid_thw")
        cat = lambda parts: torch.cat(parts) if parts else None  # noqa: E731
        encoded = _Encoded(
            blocks=_blocks(pooled),
            attention=cat([a for a in self._attention if a is not None]),
            features=cat(self._features),
            sizes=None if sizes is None else [tuple(int(v) for v in s) for s in (sizes.tolist() if hasattr(sizes, "tolist") else sizes)],
            grids=None if grids is None else [tuple(int(v) for v in g) for g in grids.tolist()],
        )
        self._attention, self._features, self._patch_grids = [], [], []
        self._encoded = (self._encoded + [encoded])[-_KEEP_ENCODED:]
        self._encode_count += 1

    def _on_base(self, module: Any, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            self._ids = ids
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        pooled = getattr(encoded, "pooler_output", None)
        self._scattered = None if pooled is None else _blocks(pooled)
        self._forward_mark = self._encode_count

    def _on_attention_input(self, module: Any, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs["hidden_states"]
        with torch.no_grad():
            n, t, _ = x.shape
            heads = x.shape[-1] // module.head_dim
            q = module.q_proj(x[:, :1]).float().view(n, 1, heads, module.head_dim).transpose(1, 2)
            k = module.k_proj(x).float().view(n, t, heads, module.head_dim).transpose(1, 2)
            probs = torch.softmax((q @ k.transpose(-1, -2)) * module.scale, dim=-1)  # (N, H, 1, T)
            self._attention.append(probs[:, :, 0, 1:].mean(dim=1))

    def _on_layer_output(self, module: Any, args: tuple, output: Any) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        self._features.append(hidden.detach())

    def _on_qwen_visual(self, module: Any, args: tuple, kwargs: dict) -> None:
        self._attention.append(None)  # filled by the attention hook of this vision forward

    def _on_qwen_attention(self, module: Any, args: tuple, kwargs: dict) -> None:
        from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

        x = args[0] if args else kwargs["hidden_states"]
        cu = kwargs.get("cu_seqlens", args[1] if len(args) > 1 else None)
        cos, sin = kwargs["position_embeddings"]
        with torch.no_grad():
            seq = x.shape[0]
            q, k, _ = module.qkv(x).reshape(seq, 3, module.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
            q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
            q, k = q.float().transpose(0, 1), k.float().transpose(0, 1)  # (H, T, hd)
            received = torch.zeros(seq, dtype=torch.float32, device=x.device)
            bounds = cu.tolist()
            for start, end in zip(bounds[:-1], bounds[1:]):
                keys = k[:, start:end]
                total = torch.zeros(end - start, dtype=torch.float32, device=x.device)
                for q0 in range(start, end, 1024):  # query blocks bound the memory to H·1024·T
                    probs = torch.softmax((q[:, q0:min(q0 + 1024, end)] @ keys.transpose(-1, -2)) * module.scaling, dim=-1)
                    total += probs.sum(dim=(0, 1))
                received[start:end] = total / (module.num_heads * (end - start))
        if self._attention:
            self._attention[-1] = received
        else:
            self._attention.append(received)

    def on_inputs(self, embeds: torch.Tensor) -> None:
        self._embeds = embeds

    # ------------------------------------------------------------------ images and views
    def _source(self, block: torch.Tensor) -> tuple[_Encoded, int]:
        """The encoding and image index a scattered feature block came from."""
        for encoded in reversed(self._encoded):
            for index, candidate in enumerate(encoded.blocks):
                if candidate is block:
                    return encoded, index
        for encoded in reversed(self._encoded):  # copied on the way (a device move, a cat): same values
            for index, candidate in enumerate(encoded.blocks):
                if candidate.shape == block.shape and torch.equal(candidate, block.to(candidate.device, candidate.dtype)):
                    return encoded, index
        raise StageCannotRun("an image's features in the prompt match no image the vision encoder encoded")

    def images(self, roles: Any) -> list[tuple[int, torch.Tensor, _Encoded, int]]:
        """Each image of the prefill, in the order the model scatters them.

        Returns:
            ``(row, prompt positions of its placeholders, its encoding, its index there)`` per image.

        Raises:
            StageCannotRun: the images cannot be matched to their placeholders (the request then
                passes through unpruned).
        """
        if self._ids is None or self._ids.shape != roles.valid.shape:
            raise StageCannotRun("the pre-LLM stage did not see this prefill's input_ids")
        if self._scattered is not None:
            blocks = self._scattered
        elif self._encode_count > self._forward_mark and self._encoded:
            blocks = self._encoded[-1].blocks
        else:
            raise StageCannotRun("no image features reached the language model in this forward")
        placeholders = (self._ids.to(roles.valid.device) == self._image_token_id) & roles.valid
        rows, cols = torch.nonzero(placeholders, as_tuple=True)  # row-major, the order masked_scatter fills
        lengths = [int(block.shape[0]) for block in blocks]
        if sum(lengths) != rows.numel():
            raise StageCannotRun(f"{rows.numel()} image placeholders but {sum(lengths)} image features")
        out, start = [], 0
        for block, length in zip(blocks, lengths):
            row = rows[start:start + length]
            if length == 0 or bool((row != row[0]).any()):
                raise StageCannotRun("an image's placeholders span two rows of the batch")
            encoded, index = self._source(block)
            out.append((int(row[0]), cols[start:start + length], encoded, index))
            start += length
        return out

    def views(self, roles: Any) -> list[View]:
        """Every view of the prefill, in prompt order, with the captured signals of its tokens.

        Args:
            roles: the prefill's unpruned :class:`runtime.pruner.Roles`.

        Returns:
            :class:`View` list: LLaVA one per image; LLaVA-NeXT base then high-res per image;
            Qwen-VL one per image.

        Raises:
            StageCannotRun: the images or their signals cannot be mapped to the prompt.
        """
        views = {"llava_next": self._next_views, "qwen2_vl": self._qwen_views, "qwen2_5_vl": self._qwen_views}.get(self._family, self._llava_views)
        out = []
        for row, positions, encoded, index in self.images(roles):
            out.extend(views(roles, row, positions, encoded, index))
        return out

    def _signal(self, encoded: _Encoded, name: str) -> torch.Tensor | None:
        if name not in self.capture:
            return None
        value = encoded.attention if name == "attention" else encoded.features
        if value is None:
            raise StageCannotRun("the vision encoder ran without the stage's hooks, so no pre-LLM signal was captured")
        return value

    def _llava_views(self, roles: Any, row: int, positions: torch.Tensor, encoded: _Encoded, index: int) -> list[View]:
        n = positions.numel()
        side = math.isqrt(n)
        view = View(row, positions, (side, side) if side * side == n else None)
        attention, features = self._signal(encoded, "attention"), self._signal(encoded, "features")
        for signal, store in (("attention", attention), ("features", features)):
            if store is None:
                continue
            width = store.shape[1] - (1 if signal == "features" else 0)
            if index >= store.shape[0] or width != n:
                raise StageCannotRun(f"an image has {n} tokens but its encoder signal has {width} patches (strategy 'default' expected)")
            if signal == "attention":
                view.attention = store[index].float()
            else:
                view.clssim = prellm.cls_similarity(store[index][1:], store[index][0])
        return [view]

    def _next_views(self, roles: Any, row: int, positions: torch.Tensor, encoded: _Encoded, index: int) -> list[View]:
        config = self._model.config
        side = config.vision_config.image_size // config.vision_config.patch_size
        patches = side * side
        newline = ~roles.visual[row, positions]
        attention, features = self._signal(encoded, "attention"), self._signal(encoded, "features")
        source = None
        if encoded.sizes is not None and index < len(encoded.sizes):
            pinpoints = tuple(tuple(int(v) for v in p) for p in config.image_grid_pinpoints)
            crop, patch = config.vision_config.image_size, config.vision_config.patch_size
            first_crop = sum(_next_sources(pinpoints, crop, patch, size)[1] for size in encoded.sizes[:index])
            source, _ = _next_sources(pinpoints, crop, patch, encoded.sizes[index])
            if source.numel() != positions.numel() or not torch.equal((source < 0).to(newline.device), newline):
                raise StageCannotRun(f"the LLaVA-NeXT layout of a {encoded.sizes[index]} image does not match its {positions.numel()} placeholders")
            source = source.to(positions.device) + first_crop * patches
        elif attention is not None or features is not None:
            raise StageCannotRun("no image_sizes reached get_image_features; LLaVA-NeXT crops cannot be mapped to tokens")
        clssim = None
        if features is not None:  # each crop's patches against that crop's own CLS
            clssim = torch.stack([prellm.cls_similarity(f[1:], f[0]) for f in features]).flatten()
        attention = attention.float().flatten() if attention is not None else None
        prunable = torch.nonzero(~newline).flatten()
        base, rest = prunable[:patches], prunable[patches:]
        parts = [(base, (side, side))]
        if rest.numel():
            after = newline.clone()
            after[: int(base[-1]) + 1 if base.numel() else 0] = False
            lines = int(after.sum())
            parts.append((rest, (lines, rest.numel() // lines) if lines and rest.numel() % lines == 0 else None))
        out = []
        for part, grid in parts:
            view = View(row, positions[part], grid)
            if source is not None:
                src = source[part].cpu()
                view.attention = attention[src] if attention is not None else None
                view.clssim = clssim[src] if clssim is not None else None
            out.append(view)
        return out

    def _qwen_views(self, roles: Any, row: int, positions: torch.Tensor, encoded: _Encoded, index: int) -> list[View]:
        merge = int(self._model.config.vision_config.spatial_merge_size)
        attention = self._signal(encoded, "attention")
        if encoded.grids is None or index >= len(encoded.grids):
            if attention is not None:
                raise StageCannotRun("no image_grid_thw reached get_image_features; Qwen-VL patches cannot be mapped to tokens")
            return [View(row, positions, None)]
        t, h, w = encoded.grids[index]
        if t * h * w // merge**2 != positions.numel():
            raise StageCannotRun(f"a Qwen-VL image of grid {(t, h, w)} does not match its {positions.numel()} placeholders")
        view = View(row, positions, (t * h // merge, w // merge))
        if attention is not None:
            first = sum(a * b * c for a, b, c in encoded.grids[:index])
            patches = attention[first:first + t * h * w]
            view.attention = patches.view(-1, merge * merge).mean(dim=1)  # mean over each merge group
        return [view]

    # ------------------------------------------------------------------ per view
    def scores(self, roles: Any) -> list[dict]:
        """Per view: its row, positions, grid row of each token and every captured score (calibration)."""
        out = []
        for view in self.views(roles):
            n = view.positions.numel()
            entry = {"row": view.row, "positions": view.positions}
            cols = view.grid[1] if view.grid is not None else n
            entry["grid_row"] = (torch.arange(n) // max(cols, 1)).float()
            if self._embeds is not None:
                x = self._embeds[view.row, view.positions.to(self._embeds.device)]
                entry["gprune"] = prellm.gprune_scores(x, **self.params)
            if view.attention is not None:
                entry["fopru"] = view.attention.float()
            if view.clssim is not None:
                entry["clssim"] = view.clssim.float()
            out.append(entry)
        return out

    def keep(self, roles: Any) -> torch.Tensor:
        """(B, L) bool: the visual tokens that enter layer 0 (LLaVA-NeXT newlines are never dropped).

        Raises:
            StageCannotRun: the images cannot be mapped (the pruner passes the request through).
        """
        try:
            kept = torch.zeros_like(roles.visual)
            for view in self.views(roles):
                if self.method == "g-prune":
                    x = self._embeds[view.row, view.positions.to(self._embeds.device)]
                    scores = prellm.gprune_scores(x, **self.params)
                elif self.method == "cls-inflection":
                    scores = view.clssim
                else:
                    scores = view.attention
                mask = view_keep(self.method, scores, self.keep_ratio, view.grid, self.detector)
                kept[view.row, view.positions[mask.to(view.positions.device)]] = True
        finally:
            self._embeds = None
            self._ids = None
        return kept

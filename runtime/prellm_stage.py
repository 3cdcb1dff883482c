"""The pre-LLM stage at run time: drop visual tokens on entry to decoder layer 0.

A stage is a selection on entry to layer 0 (the "K = 0 pruner"), so it needs nothing beyond the
pruner's own mechanism and works unchanged under ``generate()``. This module is the mechanism: it
records what each ``get_image_features`` call returned and the vision signals the model's family
captures during it (:meth:`runtime.families.Family.signal_hooks`), matches images to their
placeholders the way the model scatters them, asks the family for each image's *views*
(:meth:`runtime.families.Family.views`: patch grids ranked together, with their tokens' signals),
and asks the stage (:data:`runtime.methods.stages.STAGES`) which tokens of each view stay.

Which stages a model can run follows from both sides: a stage names the vision signals it reads
(``Stage.signals``), a family the signals its encoder gives and why not the others
(``Family.signals``), plus what a model of the family needs for any stage
(``Family.stage_precondition``).

Pure torch; the scorers are in :mod:`runtime.prellm`.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import StageCannotRun
from .families import FAMILIES, Encoded, View, family_for
from .methods.stages import STAGES
from .methods.stages._vision import VisionContext, projector
from .state import InstancePatch, PerThread

_SIGNALS = ("attention", "features")  # the families' signals; anything else recorded is a stage's probe


@dataclass
class _Probed(Encoded):
    """An :class:`Encoded` with the probing stages' tensors (``Stage.probes``), each ``(crops, 1 + P, ...)``."""

    probes: dict = field(default_factory=dict)


def _stage_reason(family: Any, stage: Any, model: Any = None) -> str | None:
    """Why ``family`` cannot give ``stage`` the signals it reads, or ``model`` cannot run it (``None``: it can)."""
    for signal in stage.signals:
        if signal not in family.signals:
            return "it is not implemented for this family"
        if family.signals[signal] is not None:
            return family.signals[signal]
    return stage.model_reason(model, family) if model is not None else None


def unsupported_reason(model: Any, method: str) -> str | None:
    """Why ``model`` cannot run pre-LLM ``method`` (one line naming the alternatives), or ``None``.

    Args:
        model: any VLM.
        method: a :data:`runtime.methods.stages.STAGES` name.

    Returns:
        The reason, or ``None`` when the stage is supported.

    Example:
        >>> unsupported_reason(qwen.model, "cls-inflection")   # doctest: +SKIP
        "pre-LLM stage 'cls-inflection' is not supported on model_type 'qwen2_vl' (its vision encoder has no CLS token); use g-prune, fopru-rank or fopru-row"
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = FAMILIES.get(model_type)
    if family is None or not family.pre_llm:
        supported = ", ".join(t for t, f in FAMILIES.items() if f.pre_llm)
        return f"pre-LLM stage {method!r} is not supported on model_type {model_type!r}: pre-LLM stages support model types {supported}"
    if method not in STAGES:
        return f"pre-LLM stage {method!r} is unknown; choose one of {', '.join(STAGES)}"
    why = _stage_reason(family, STAGES[method], model)
    if why is not None:
        others = [name for name, stage in STAGES.items() if _stage_reason(family, stage, model) is None]
        return f"pre-LLM stage {method!r} is not supported on model_type {model_type!r} ({why}); use {STAGES.choices(others)}"
    return family.stage_precondition(model)


def supported_methods(model: Any) -> tuple[str, ...]:
    """The pre-LLM methods ``model`` can run (empty for an unsupported family).

    Example:
        >>> supported_methods(qwen.model)   # doctest: +SKIP
        ('g-prune', 'fopru-rank', 'fopru-row')
    """
    return tuple(m for m in STAGES if unsupported_reason(model, m) is None)


def check_supported(model: Any, method: str | None = None) -> None:
    """Raise ValueError saying why ``model`` cannot run ``method`` (default: any pre-LLM stage).

    Example:
        >>> check_supported(tiny.model, "fopru-row")   # doctest: +SKIP
    """
    methods = (method,) if method is not None else tuple(STAGES)
    reasons = [unsupported_reason(model, m) for m in methods]
    if all(reasons):
        raise ValueError(reasons[0])


def view_keep(method: str, scores: torch.Tensor, keep_ratio: float | None, grid: tuple[int, int] | None,
              detector: str = "kneedle") -> torch.Tensor:
    """The survivors of one view from its per-token scores (shared by the runtime and the compiler).

    Args:
        method: a :data:`runtime.methods.stages.STAGES` name; its scores are what the stage's
            calibration statistic records (G-Prune's propagated information, FoPru's
            significance, CLS-inflection's CLS similarity).
        scores: (n,) in the view's row-major order.
        keep_ratio: fixed-ratio methods: the kept fraction (``runtime.prellm.stage_count``).
        grid: (rows, cols) of the view (``fopru-row``).
        detector: ``cls-inflection``'s knee detector.

    Returns:
        (n,) bool mask (original order).

    Example:
        >>> view_keep("fopru-rank", torch.tensor([0.1, 0.5, 0.2, 0.4]), 0.5, (2, 2)).tolist()
        [False, True, False, True]
    """
    return STAGES[method].keep(scores, keep_ratio, grid, {"inflection_detector": detector})


_KEEP_ENCODED = 4  # encodings remembered per thread: generate() encodes once, then prefills


def _blocks(pooled: Any) -> list:
    if isinstance(pooled, torch.Tensor):
        return list(pooled) if pooled.dim() == 3 else [pooled]
    return list(pooled)


class PreLLMStage:
    """One pre-LLM method with its parameters; hooks the vision encoder and picks layer-0 survivors.

    Args:
        method: a :data:`runtime.methods.stages.STAGES` name, or ``None`` to only record the vision
            signals and every stage's scores (the calibration pass, :meth:`scores`).
        keep_ratio: fraction of each view's tokens kept (fixed-ratio methods; ignored by stages
            that pick their own count, such as ``cls-inflection``).
        params: the stage's ``pre_llm.params`` (e.g. G-Prune ``threshold``, FoPru
            ``feature_layer``, ``inflection_detector``); the calibration pass passes every stage's.
        capture: which vision signals to record (default: what ``method`` reads; the calibration
            pass asks for all the model supports).

    Images are matched to their placeholders the way the model itself fills them: the feature
    blocks the base model scatters (``generate`` hands them over in ``mm_encoder_outputs``, expanded
    for beam search; a plain forward encodes them itself) split the row-major run of placeholders,
    and each block is traced back to the ``get_image_features`` call that produced it, whose vision
    signals it then reads. So adjacent images, several images per row, beam search and any batch
    layout map exactly. What the hooks capture for the request in flight is kept per thread
    (:mod:`runtime.state`).
    """

    _signals = PerThread(dict)  # per signal, one value per vision forward of the current encode
    _encoded = PerThread(list)  # recent Encoded, oldest first
    _encode_count = PerThread(lambda: 0)
    _forward_mark = PerThread(lambda: 0)  # _encode_count when the prefill's base forward began
    _scattered = PerThread()  # the blocks mm_encoder_outputs carried into this forward, if any
    _ids = PerThread()
    _embeds = PerThread()
    _writes = PerThread(list)  # (row, kept positions, features) a feature-writing stage produced

    def __init__(self, method: str | None, keep_ratio: float = 1.0, params: dict | None = None, capture: set | None = None) -> None:
        if method is not None and method not in STAGES:
            raise ValueError(f"unknown pre-LLM method {method!r}; choose one of {', '.join(STAGES)}")
        self.method = method
        self.stage = None if method is None else STAGES[method]
        self.keep_ratio = float(keep_ratio)
        params = dict(params or {})
        self.params = params if self.stage is None else self.stage.resolve(params)
        self.feature_layer = params.get("feature_layer")
        if capture is None:
            capture = set(self.stage.signals) if self.stage is not None else set()
        self.capture = set(capture)
        self._family: Any = None
        self._model: Any = None
        self._probers: list = []
        self._project: Any = None

    def __deepcopy__(self, memo: dict) -> "PreLLMStage":
        return self  # shared with the handle that owns it (see PruningHandle._deepcopy_model)

    # ------------------------------------------------------------------ hooks
    def attach(self, model: Any) -> list:
        """Install the hooks this stage needs; returns removable handles.

        Raises:
            ValueError: the model cannot run this method (one line, with the alternatives).
        """
        check_supported(model, self.method)
        family = family_for(model)
        for signal in sorted(self.capture):
            why = family.signals.get(signal, "it is not implemented for this family")
            if signal not in family.signals or why is not None:
                raise ValueError(f"model_type {model.config.model_type!r} cannot give the pre-LLM signal {signal!r} ({why})")
        self._family = family
        self._model = model
        self._image_token_id = int(family.image_token_id(model))
        base = family.base_model(model)
        hooks = [base.register_forward_pre_hook(self._on_base, with_kwargs=True)]
        original = base.get_image_features
        signature = inspect.signature(original)

        @functools.wraps(original)  # generate() reads the signature through __wrapped__
        def get_image_features(*args: Any, **kwargs: Any) -> Any:
            self._signals = {}
            output = original(*args, **kwargs)
            self._remember(output, signature.bind_partial(*args, **kwargs).arguments)
            return output

        hooks.append(InstancePatch(base, "get_image_features", get_image_features))
        if self.capture:
            hooks.extend(family.signal_hooks(model, self.capture, self.feature_layer, self._record))
        # Probing stages (VisionZip, VTC-CLS, PruMerge+) read encoder internals of their own; the
        # calibration pass (no method) installs those of every stage the model supports.
        candidates = [self.stage] if self.stage is not None else [
            stage for name, stage in STAGES.items() if stage.probes and unsupported_reason(model, name) is None]
        self._probers = [stage for stage in candidates if stage.probes]
        for stage in self._probers:
            params = self.params if stage is self.stage else stage.resolve({})
            hooks.extend(stage.probe_hooks(model, family, params, self._record))
        self._project = projector(model, family) if self._probers else None
        return hooks

    def _record(self, signal: str, value: torch.Tensor) -> None:
        self._signals.setdefault(signal, []).append(value)

    def _remember(self, output: Any, arguments: dict) -> None:
        pooled = getattr(output, "pooler_output", None)
        if pooled is None and isinstance(output, (tuple, list)) and output:
            pooled = output[0]
        if pooled is None:
            return
        captured = self._signals
        cat = lambda name: torch.cat(captured[name]) if captured.get(name) else None  # noqa: E731
        encoded = _Probed(blocks=_blocks(pooled), attention=cat("attention"), features=cat("features"),
                          layout=self._family.image_layout(arguments),
                          probes={name: cat(name) for name in captured if name not in _SIGNALS})
        self._signals = {}
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

    def on_inputs(self, embeds: torch.Tensor) -> None:
        self._embeds = embeds

    # ------------------------------------------------------------------ images and views
    def _source(self, block: torch.Tensor) -> tuple[Encoded, int]:
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

    def images(self, roles: Any) -> list[tuple[int, torch.Tensor, Encoded, int]]:
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
            :class:`runtime.families.View` list, as the model's family splits each image.

        Raises:
            StageCannotRun: the images or their signals cannot be mapped to the prompt.
        """
        out = []
        for row, positions, encoded, index in self.images(roles):
            views = self._family.views(self._model, roles, row, positions, encoded, index,
                                       functools.partial(self._signal, encoded))
            if self._probers and getattr(encoded, "probes", None):
                self._attach_sources(views, roles, row, positions, encoded, index)
            out.extend(views)
        return out

    def _attach_sources(self, views: list, roles: Any, row: int, positions: torch.Tensor, encoded: Any, index: int) -> None:
        """Give each view its :class:`VisionContext`: which encoder patch each token is.

        The family maps its ``"attention"`` signal (one value per encoder patch) to view tokens; fed
        the patch numbers instead, the same mapping tells each token's source patch.
        """
        first = next(iter(encoded.probes.values()))
        crops, patches = int(first.shape[0]), int(first.shape[1]) - 1
        code = torch.arange(crops * patches, dtype=torch.float64).view(crops, patches)
        coded = self._family.views(self._model, roles, row, positions, encoded, index,
                                   lambda name: code if name == "attention" else None)
        if len(coded) != len(views) or any(c.attention is None for c in coded):
            raise StageCannotRun("the vision probes cannot be mapped to this image's tokens")
        for view, twin in zip(views, coded):
            view.vision = VisionContext(twin.attention.round().long(), encoded.probes, self._project)

    def _signal(self, encoded: Encoded, name: str) -> torch.Tensor | None:
        if name not in self.capture:
            return None
        value = getattr(encoded, name)
        if value is None:
            raise StageCannotRun("the vision encoder ran without the stage's hooks, so no pre-LLM signal was captured")
        return value

    # ------------------------------------------------------------------ per view
    def scores(self, roles: Any) -> list[dict]:
        """Per view: its row, positions, grid row of each token and every stage's scores it can
        compute from what was captured, under the stage's statistic name (calibration)."""
        out = []
        for view in self.views(roles):
            n = view.positions.numel()
            entry = {"row": view.row, "positions": view.positions}
            probed = getattr(view, "vision", None)
            probes = set(probed.probes) if probed is not None else set()
            cols = view.grid[1] if view.grid is not None else n
            entry["grid_row"] = (torch.arange(n) // max(cols, 1)).float()
            for stage in STAGES.values():
                if stage.statistic in entry or not set(stage.signals) <= self.capture or not set(stage.probes) <= probes:
                    continue
                value = stage.scores(view, self._embeds, self.params)
                if value is not None:
                    entry[stage.statistic] = value.float()
            out.append(entry)
        return out

    def keep(self, roles: Any) -> torch.Tensor:
        """(B, L) bool: the visual tokens that enter layer 0 (LLaVA-NeXT newlines are never dropped).

        A feature-writing stage's new embeddings for the kept tokens are left for :meth:`writes`.

        Raises:
            StageCannotRun: the images cannot be mapped (the pruner passes the request through).
        """
        try:
            kept = torch.zeros_like(roles.visual)
            writes = []
            for view in self.views(roles):
                selection = self.stage.select(view, self._embeds, self.keep_ratio, self.params)
                positions = view.positions[selection.keep.to(view.positions.device)]
                kept[view.row, positions] = True
                if selection.features is not None:
                    writes.append((view.row, positions, selection.features))
            self._writes = writes
        finally:
            self._embeds = None
            self._ids = None
        return kept

    def writes(self) -> list:
        """The ``(row, prompt positions, features)`` of the last :meth:`keep`'s feature-writing views (then cleared)."""
        writes, self._writes = self._writes, []
        return writes

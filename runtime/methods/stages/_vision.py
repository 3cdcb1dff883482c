"""Vision-encoder probes for the peer stages that read more than the families' signals.

VisionZip, VTC-CLS and PruMerge+ read encoder internals the families' ``"attention"`` /
``"features"`` signals do not carry (keys, several layers' CLS rows, a layer's q/k at full width,
the feature layer's hidden states before the projector). A stage names its probes
(``Stage.probes``) and installs them with :func:`on_attention_input` / :func:`on_layer_output`
on the family's vision layers (:meth:`runtime.families.Family.vision_layers`), so no family
code changes. Every probe records one tensor per vision forward shaped ``(crops, 1 + P, ...)``:
the encoder's own sequence, CLS first. The mechanism (:mod:`runtime.prellm_stage`) concatenates
them per encoding and gives each view a :class:`VisionContext` saying which encoder patch each of
its tokens is (``source``, ``crop · P + patch``), found through the family's own view mapping.

These probes need a CLIP-style attention module (``q_proj``, ``k_proj``, ``head_dim``, ``scale``);
the stages that use them also read the family's ``"features"`` signal, so a family whose encoder
has no CLS token refuses them with its reason before any hook is installed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ...errors import StageCannotRun


@dataclass
class VisionContext:
    """What a probing stage sees of one view beyond its signals.

    Attributes:
        source: (n,) int64, per view token its encoder patch ``crop · P + patch`` (patch 0-based,
            CLS excluded) in the encoding's crops.
        probes: the encoding's probe tensors by name, each ``(crops, 1 + P, ...)``.
        project: the model's projector (encoder features → language-model input embeddings), or
            ``None`` when the model has none the runtime can call.
    """

    source: torch.Tensor
    probes: dict = field(default_factory=dict)
    project: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def patches(self) -> int:
        """``P``: patches per crop (CLS excluded)."""
        first = next(iter(self.probes.values()))
        return int(first.shape[1]) - 1

    def probe(self, name: str) -> torch.Tensor:
        """A probe by name; :class:`StageCannotRun` when the encoder ran without it."""
        value = self.probes.get(name)
        if value is None:
            raise StageCannotRun(f"the vision encoder ran without the {name!r} probe the stage reads")
        return value

    def crops(self) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """The view's tokens grouped by crop: ``(crop, view indices, patch indices)``, crops ascending."""
        P = self.patches
        crop, patch = self.source // P, self.source % P
        out = []
        for c in torch.unique(crop).tolist():
            index = torch.nonzero(crop == c).flatten()
            out.append((int(c), index, patch[index]))
        return out


def probe_reason(model: Any, family: Any, title: str, writes: bool = False) -> str | None:
    """Why ``title``'s probes cannot run on ``model`` (``None``: they can).

    They read CLIP-style attention modules (``self_attn`` with ``q_proj``, ``k_proj``, ``head_dim``)
    on one token per encoder patch; a feature-writing stage also needs the LLaVA-style projector.
    """
    try:
        layers = family.vision_layers(model)
    except (ValueError, AttributeError) as exc:
        return str(exc)
    attn = getattr(layers[0], "self_attn", None) if len(layers) else None
    if attn is None or not all(hasattr(attn, name) for name in ("q_proj", "k_proj", "head_dim")):
        return f"its vision encoder's layers have no CLIP-style self_attn (q_proj, k_proj), which {title} reads"
    if writes and projector(model, family) is None:
        return f"{title} writes merged features through a LLaVA-style multi_modal_projector, which this model lacks"
    return None


def projector(model: Any, family: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The LLaVA-style ``multi_modal_projector`` of ``model`` (``None`` if it has none)."""
    return getattr(family.base_model(model), "multi_modal_projector", None)


def clip_attention(module: Any, x: torch.Tensor, width: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys of a CLIP attention module from its input ``x`` (N, T, D), float32.

    Args:
        module: a CLIP-style attention module.
        x: its input hidden states.
        width: one head over the full width (PruMerge's ``q_proj``/``k_proj`` outputs) instead of
            the module's heads.

    Returns:
        ``(q, k)``: (N, H, T, d) each (``H = 1, d = D`` when ``width``).
    """
    if not all(hasattr(module, name) for name in ("q_proj", "k_proj", "head_dim")):
        raise StageCannotRun(f"{type(module).__name__} is not a CLIP-style attention module (q_proj, k_proj, head_dim)")
    n, t, d = x.shape
    heads, dim = (1, d) if width else (d // module.head_dim, module.head_dim)
    q = module.q_proj(x).float().view(n, t, heads, dim).transpose(1, 2)
    k = module.k_proj(x).float().view(n, t, heads, dim).transpose(1, 2)
    return q, k


def cls_rows(module: Any, x: torch.Tensor) -> torch.Tensor:
    """(N, H, T): the CLS query's post-softmax attention row per head (the module's own scale)."""
    q, k = clip_attention(module, x)
    scale = getattr(module, "scale", q.shape[-1] ** -0.5)
    return torch.softmax((q[:, :, :1] @ k.transpose(-1, -2)) * scale, dim=-1)[:, :, 0]


def on_attention_input(model: Any, family: Any, layer: int, fn: Callable[[Any, torch.Tensor], None]) -> Any:
    """A pre-hook on vision layer ``layer``'s attention module calling ``fn(module, input)`` without grad."""
    attn = family.vision_layers(model)[layer].self_attn

    def hook(module: Any, args: tuple, kwargs: dict) -> None:
        with torch.no_grad():
            fn(module, args[0] if args else kwargs["hidden_states"])

    return attn.register_forward_pre_hook(hook, with_kwargs=True)


def on_layer_output(model: Any, family: Any, layer: int, fn: Callable[[torch.Tensor], None]) -> Any:
    """A forward hook on vision layer ``layer`` calling ``fn(hidden states it outputs)``."""

    def hook(module: Any, args: tuple, output: Any) -> None:
        fn((output[0] if isinstance(output, tuple) else output).detach())

    return family.vision_layers(model)[layer].register_forward_hook(hook)


def feature_layer(model: Any, family: Any) -> int:
    """0-based vision layer whose output the model's image features come from (LLaVA: ``layers[-2]``)."""
    return family.feature_encoder_layer(model)

"""vLLM model classes that run a recipe's pre-LLM stage (imported by vLLM only; see :mod:`runtime.vllm`).

Mechanism, per family (vLLM 0.32):

* **Prompt size.** The ``ProcessingInfo`` subclass's ``get_num_image_tokens`` returns the kept
  count (``stage_count`` per view; LLaVA-NeXT adds its row-end newlines, which are never pruned).
  It feeds vLLM's prompt replacement and the profiler's maximum, so the scheduler, the KV cache
  and the reported ``prompt_tokens`` all see the pruned prompt.
* **Features.** ``embed_multimodal`` runs the stock encoder and projector, scores each view with
  the runtime's own scorers (:mod:`runtime.prellm`) and selects with
  :func:`runtime.prellm_stage.view_keep`, exactly as the HF runtime does, and returns the kept
  rows in their original order. FoPru's CLS→patch attention is recomputed from the chosen vision
  layer's fused q/k projection (vLLM's fused attention returns no weights).
* **Positions.** The HF runtime keeps each kept token at its original position. vLLM numbers a
  prompt 0..L'-1 unless the model supplies positions, which vLLM asks for only from M-RoPE models:
  so the LLaVA language model gets a one-section M-RoPE (``[head_dim/2, 0, 0]``: every frequency
  reads row 0, i.e. plain RoPE), and :meth:`get_mrope_input_positions` puts each kept token at its
  original index and the text after an image where it was. That needs the selection when the
  request is admitted, so it is made there (encoder, projector, stage, for that image alone) and
  handed to ``embed_multimodal`` through a bounded cache keyed by the image's pixels: positions
  and features always come from the same selection.
  vLLM's in-tree hook for pruned positions, ``SupportsMultiModalPruning.recompute_mrope_positions``,
  is not used: in vLLM 0.32 the CPU model runner never enables it (``CPUModelRunner.load_model``
  leaves ``is_multimodal_pruning_enabled`` False) and the GPU runner only when
  ``video_pruning_rate > 0``.
"""
from __future__ import annotations

import hashlib
import logging
import math
from collections import OrderedDict
from types import SimpleNamespace
from typing import Any, Sequence

import numpy as np
import torch
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size, tensor_model_parallel_all_reduce
from vllm.model_executor.models.interfaces import SupportsMRoPE
from vllm.model_executor.models.llava import LlavaDummyInputsBuilder, LlavaForConditionalGeneration, LlavaMultiModalProcessor, LlavaProcessingInfo
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
    get_anyres_image_grid_shape,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from . import prellm
from .errors import RecipeError, RecipeMismatchError
from .families import FAMILIES
from .methods.stages import STAGES
from .prellm import stage_count
from .prellm_stage import view_keep
from .vllm import CONFIG_KEY, recipe_from_config

logger = logging.getLogger("vllm.recipe_compiler")  # under "vllm": printed by vLLM's own handler
_said: set = set()


def _say_once(message: str) -> None:
    if message not in _said and get_tensor_model_parallel_rank() == 0:
        _said.add(message)
        logger.info("recipe runtime (vLLM): %s", message)


def _stage(hf_config: Any) -> dict:
    return getattr(hf_config, CONFIG_KEY)["pre_llm"]


def _next_layout(hf_config: Any, height: int, width: int) -> tuple[int, int, int]:
    """``(base, rows, cols)`` of one packed LLaVA-NeXT image, with vLLM's own arithmetic."""
    vision = hf_config.vision_config
    side = int(vision.image_size) // int(vision.patch_size)
    grid_h, grid_w = get_anyres_image_grid_shape((height, width), hf_config.image_grid_pinpoints, int(vision.image_size))
    unpadded, rows = LlavaNextProcessingInfo._get_num_unpadded_features(
        None, original_height=height, original_width=width, npatches=side, num_patch_height=grid_h, num_patch_width=grid_w
    )
    return side * side, int(rows), int(unpadded) // int(rows)


def check_recipe(model_config: Any) -> None:
    """Refuse to start (one line) unless the carried recipe's fingerprint matches the model's config.

    Raises:
        RecipeMismatchError: the first differing field, as :meth:`runtime.Recipe.check_model` names it.
        RecipeError: the config carries no recipe, or a corrupt one.
    """
    try:
        recipe_from_config(model_config.hf_config).check_model(_shim(model_config.hf_config))
    except RecipeMismatchError as exc:
        raise RecipeMismatchError(f"{exc} (model {model_config.model})") from None


def _shim(hf_config: Any) -> Any:
    """What the runtime's fingerprint and stage checks read of a HF model, built from vLLM's hf_config.

    The vision depth is the config's (vLLM builds the tower only up to the feature layer).
    """
    depth = int(hf_config.vision_config.num_hidden_layers)
    tower = SimpleNamespace(encoder=SimpleNamespace(layers=[None] * depth))
    return SimpleNamespace(config=hf_config, language_model=SimpleNamespace(config=hf_config.get_text_config()), vision_tower=tower)


# ----------------------------------------------------------------------------------- processing


class RecipeLlavaProcessingInfo(LlavaProcessingInfo):
    """LLaVA-1.5: an image keeps ``round_half_up(r · n)`` of its ``n`` tokens."""

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        check_recipe(ctx.model_config)  # the processor is built before the engine: refuse before any model time

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        n = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        return stage_count(_stage(self.get_hf_config())["keep_ratio"], n)


class RecipeLlavaNextProcessingInfo(LlavaNextProcessingInfo):
    """LLaVA-NeXT: each view (base crop, high-res grid) keeps its share; every row-end newline stays."""

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        check_recipe(ctx.model_config)

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        config = self.get_hf_config()
        ratio = _stage(config)["keep_ratio"]
        base, rows, cols = _next_layout(config, image_height, image_width)
        return stage_count(ratio, base) + stage_count(ratio, rows * cols) + rows


# ----------------------------------------------------------------------------------- models


class _RecipeStageMixin:
    """What the pruned LLaVA-family classes share: the stage, its signals, the kept tokens' positions."""

    # Images selected at admission and not yet embedded; an encoder-cache hit never collects its entry, so
    # the oldest go first (64 LLaVA-1.5-7B images in bf16 hold about 75 MB).
    _CACHE = 64

    def _recipe_init(self, vllm_config: Any) -> None:
        config = vllm_config.model_config.hf_config
        recipe = recipe_from_config(config)
        spec = recipe.pre_llm
        self._recipe_method = spec["method"]
        self._recipe_ratio = float(spec["keep_ratio"])
        params = spec.get("params", {})
        gprune = STAGES["g-prune"].defaults
        self._recipe_gprune = {**gprune, **{k: v for k, v in params.items() if k in gprune}}
        self._recipe_signal: list[torch.Tensor] = []
        self._recipe_selected: OrderedDict = OrderedDict()
        rope = getattr(config.text_config, "rope_parameters", None) or {}
        head_dim = int(getattr(config.text_config, "head_dim", None) or config.text_config.hidden_size // config.text_config.num_attention_heads)
        if rope.get("mrope_section") != [head_dim // 2, 0, 0] or rope.get("rope_type", "default") != "default":
            raise RecipeError(
                f"the language model's rope_parameters {rope} are not what runtime.vllm.overrides() sets "
                f"(mrope_section [{head_dim // 2}, 0, 0], rope_type default); pass its hf_overrides unchanged"
            )
        if self._recipe_method.startswith("fopru"):
            self._recipe_hook_fopru(config, params.get("feature_layer"))
        if recipe.pruning_layers:
            _say_once(
                f"the recipe also prunes inside the language model at layers {recipe.pruning_layers}; vLLM's paged KV "
                f"cache cannot, so only its pre-LLM stage ({self._recipe_method}, keep ratio {self._recipe_ratio}) is served"
            )
        _say_once(f"serving pre-LLM stage {self._recipe_method} at keep ratio {self._recipe_ratio}")

    # ---------------------------------------------------------------- FoPru signal
    def _recipe_hook_fopru(self, config: Any, feature_layer: int | None) -> None:
        shim = _shim(config)
        hidden = FAMILIES[config.model_type].resolve_feature_layer(shim, feature_layer, "the recipe's pre_llm feature_layer")
        layers = self.vision_tower.vision_model.encoder.layers
        if hidden > len(layers):
            raise RecipeError(
                f"FoPru reads vision layer {hidden}, but vLLM builds the vision tower only up to the feature layer "
                f"({len(layers)} layers, vision_feature_layer {config.vision_feature_layer}); compile with a "
                f"--fopru-feature-layer at or before it"
            )
        attention = layers[hidden - 1].self_attn
        total_heads = int(attention.num_heads)

        def on_qkv(module: Any, args: Any, output: Any) -> None:
            # The CLS query row against every key, from the fused projection's own q and k.
            qkv = output[0] if isinstance(output, tuple) else output
            q, k, _ = qkv.chunk(3, dim=-1)
            crops, tokens, width = k.shape
            heads = width // attention.head_dim
            with torch.no_grad():
                cls = q[:, :1].float().view(crops, 1, heads, attention.head_dim).transpose(1, 2)
                keys = k.float().view(crops, tokens, heads, attention.head_dim).transpose(1, 2)
                probs = torch.softmax((cls @ keys.transpose(-1, -2)) * attention.scale, dim=-1)  # (crops, H, 1, T)
                summed = probs[:, :, 0, 1:].sum(dim=1)
                if get_tensor_model_parallel_world_size() > 1 and heads != total_heads:
                    summed = tensor_model_parallel_all_reduce(summed)  # heads are split over the TP ranks
                self._recipe_signal.append(summed / total_heads)

        attention.qkv_proj.register_forward_hook(on_qkv)

    def _recipe_scores(self, features: torch.Tensor, significance: torch.Tensor | None) -> torch.Tensor:
        if self._recipe_method == "g-prune":
            return prellm.gprune_scores(features, **self._recipe_gprune)
        return significance

    # ---------------------------------------------------------------- selection
    def _recipe_run(self, kwargs: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Encoder + projector + stage on a batch of images: per image (kept features, keep mask)."""
        self._recipe_signal = []
        embeds = self._recipe_stock.embed_multimodal(self, **kwargs)
        signal = torch.cat(self._recipe_signal) if self._recipe_signal else None
        self._recipe_signal = []
        keeps = self._recipe_select(list(embeds), signal, kwargs)
        return [(e[k.to(e.device)], k.cpu()) for e, k in zip(embeds, keeps)]

    def _recipe_key(self, item: dict) -> bytes:
        digest = hashlib.blake2b(digest_size=16)
        for name in sorted(item):
            value = item[name]
            value = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
            digest.update(name.encode())
            digest.update(str(tuple(value.shape)).encode())
            digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return digest.digest()

    def _recipe_selection(self, item: dict) -> torch.Tensor:
        """The keep mask of one image (its run of placeholders, original order), selecting it if needed."""
        key = self._recipe_key(item)
        if key not in self._recipe_selected:
            device = next(self.parameters()).device
            batched = {name: value.to(device)[None] for name, value in item.items()}
            with torch.inference_mode():
                self._recipe_selected[key] = self._recipe_run(batched)[0]
            while len(self._recipe_selected) > self._CACHE:
                self._recipe_selected.popitem(last=False)
        return self._recipe_selected[key][1]

    def embed_multimodal(self, **kwargs: object) -> Any:
        """The kept projected features of each image, in original order (the same selection that set its positions)."""
        if kwargs.get("pixel_values") is None:
            _say_once("image embeddings passed in directly (no pixels) pass through unpruned")
            return self._recipe_stock.embed_multimodal(self, **kwargs)
        items = self._recipe_items(kwargs)
        found = [self._recipe_selected.pop(self._recipe_key(item), None) for item in items]
        missing = [i for i, hit in enumerate(found) if hit is None]
        if missing:
            device = next(self.parameters()).device
            batched = {}
            for name in items[0]:
                values = [torch.as_tensor(items[i][name]).to(device) for i in missing]
                same = all(v.shape == values[0].shape for v in values)
                batched[name] = torch.stack(values) if same else values  # LLaVA-NeXT: crop counts may differ
            for i, result in zip(missing, self._recipe_run(batched)):
                found[i] = result
        return [features for features, _ in found]

    def _recipe_items(self, kwargs: dict) -> list[dict]:
        raise NotImplementedError

    def _recipe_feature_item(self, feature: Any) -> dict | None:
        """One admitted image's encoder inputs (``None`` for image embeddings given directly)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- positions
    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list[Any]) -> tuple[torch.Tensor, int]:
        """The pruned prompt's positions as in the unpruned one (the HF runtime keeps them so).

        A kept image token sits at its image's first position plus its original offset; the text
        after an image of ``n`` placeholders resumes ``n`` after the image's start. All three rows
        are equal (the one-section M-RoPE reads row 0): plain RoPE at the original positions. The
        stage's selection is made here, at admission, from the image alone, and handed to
        :meth:`embed_multimodal`, so positions and features always come from the same selection.
        """
        total = len(input_tokens)
        positions = np.zeros(total, dtype=np.int64)
        source, value = 0, 0
        for feature in sorted((f for f in mm_features if f.modality == "image"), key=lambda f: f.mm_position.offset):
            start, kept = int(feature.mm_position.offset), int(feature.mm_position.length)
            item = self._recipe_feature_item(feature)
            # Embeddings given directly (no pixels) are served unpruned: every placeholder is a kept token.
            keep = self._recipe_selection(item) if item is not None else torch.ones(kept, dtype=torch.bool)
            if int(keep.sum()) != kept:
                raise RuntimeError(f"the stage kept {int(keep.sum())} tokens of an image with {kept} placeholders")
            positions[source:start] = np.arange(start - source) + value
            value += start - source
            positions[start:start + kept] = value + torch.nonzero(keep).flatten().numpy()
            value += int(keep.numel())
            source = start + kept
        positions[source:] = np.arange(total - source) + value
        value += total - source
        return torch.from_numpy(np.broadcast_to(positions, (3, total)).copy()), int(value - total)


def _llava_register(cls: type) -> type:
    return MULTIMODAL_REGISTRY.register_processor(LlavaMultiModalProcessor, info=RecipeLlavaProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder)(cls)


@_llava_register
class RecipePrunedLlavaForConditionalGeneration(_RecipeStageMixin, LlavaForConditionalGeneration, SupportsMRoPE):
    """LLaVA-1.5 with the recipe's pre-LLM stage: one view per image, its ``s×s`` patch grid."""

    _recipe_stock = LlavaForConditionalGeneration

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        check_recipe(vllm_config.model_config)  # before any layer is built
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._recipe_init(vllm_config)

    def _recipe_items(self, kwargs: dict) -> list[dict]:
        return [{"pixel_values": pv} for pv in kwargs["pixel_values"]]

    def _recipe_feature_item(self, feature: Any) -> dict | None:
        if "pixel_values" not in feature.data:
            return None
        return {"pixel_values": feature.data["pixel_values"].data}

    def _recipe_select(self, embeds: list, signal: torch.Tensor | None, kwargs: dict) -> list:
        out = []
        for image, features in enumerate(embeds):
            n = features.shape[0]
            side = math.isqrt(n)
            scores = self._recipe_scores(features, signal[image] if signal is not None else None)
            out.append(view_keep(self._recipe_method, scores, self._recipe_ratio, (side, side) if side * side == n else None))
        return out


def _next_register(cls: type) -> type:
    return MULTIMODAL_REGISTRY.register_processor(LlavaNextMultiModalProcessor, info=RecipeLlavaNextProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder)(cls)


@_next_register
class RecipePrunedLlavaNextForConditionalGeneration(_RecipeStageMixin, LlavaNextForConditionalGeneration, SupportsMRoPE):
    """LLaVA-NeXT with the recipe's pre-LLM stage: per image the base view and the high-res view; newlines stay."""

    _recipe_stock = LlavaNextForConditionalGeneration

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        check_recipe(vllm_config.model_config)  # before any layer is built
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._recipe_init(vllm_config)

    def _recipe_items(self, kwargs: dict) -> list[dict]:
        return [{"pixel_values": pv, "image_sizes": torch.as_tensor(size)} for pv, size in zip(kwargs["pixel_values"], kwargs["image_sizes"])]

    def _recipe_feature_item(self, feature: Any) -> dict | None:
        if "pixel_values" not in feature.data:
            return None
        return {"pixel_values": feature.data["pixel_values"].data, "image_sizes": torch.as_tensor(feature.data["image_sizes"].data)}

    def _sources(self, image_size: torch.Tensor, crops: int) -> torch.Tensor:
        """Per packed row: the encoder patch ``crop·P + p`` it came from, or -1 for a newline (vLLM's own packing)."""
        side = int(self.config.vision_config.image_size) // int(self.config.vision_config.patch_size)
        coded = torch.arange(crops * side * side, dtype=torch.float64).view(crops, side * side, 1)
        owner = SimpleNamespace(config=self.config, image_newline=torch.tensor([-1.0], dtype=torch.float64))
        packed = LlavaNextForConditionalGeneration._merge_image_patch_embeddings(owner, image_size.cpu(), coded, strategy="spatial_unpad")
        return packed[:, 0].round().long()

    def _recipe_select(self, embeds: list, signal: torch.Tensor | None, kwargs: dict) -> list:
        pixel_values, sizes = kwargs["pixel_values"], kwargs["image_sizes"]
        side = int(self.config.vision_config.image_size) // int(self.config.vision_config.patch_size)
        patches = side * side
        out, crop0 = [], 0
        for image, features in enumerate(embeds):
            crops = int(pixel_values[image].shape[0])
            source = self._sources(torch.as_tensor(sizes[image]), crops)
            if source.numel() != features.shape[0]:
                raise RuntimeError(f"LLaVA-NeXT image {image}: {features.shape[0]} packed features but the layout has {source.numel()}")
            newline = source < 0
            keep = newline.clone()  # row-end newlines are never pruned
            prunable = torch.nonzero(~newline).flatten()
            base, rest = prunable[:patches], prunable[patches:]
            views = [(base, (side, side))]
            if rest.numel():
                rows = int(newline[int(base[-1]) + 1:].sum())
                views.append((rest, (rows, rest.numel() // rows) if rows and rest.numel() % rows == 0 else None))
            for index, grid in views:
                significance = None
                if signal is not None:
                    significance = signal[crop0 + source[index] // patches, source[index] % patches]
                scores = self._recipe_scores(features[index.to(features.device)], significance)
                mask = view_keep(self._recipe_method, scores, self._recipe_ratio, grid)
                keep[index[mask.cpu()]] = True
            crop0 += crops
            out.append(keep)
        return out

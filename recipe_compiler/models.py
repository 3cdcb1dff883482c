"""The model loader: registry aliases, hub ids and local directories, real or random weights.

``--model`` takes a registry alias (``llava-1.5-7b``), a hub id (``org/name``) or a local
directory.  Weights come from the local directory or the local HF cache; the hub is only tried
when huggingface_hub is not in offline mode (``HF_HUB_OFFLINE``); an unreachable hub counts as
"not cached", and a refusal (gated, authentication, no such repository) is a typed
:class:`runtime.errors.HubError` saying which.  The registry is every
family's aliases (:mod:`recipe_compiler.families`), each with its full ``config.json`` embedded,
so ``random_weights=True`` builds the real architecture without reading any weights; a family
also builds its offline processor.  The built-in tiny models (``tiny-llava``, …) are small, seeded,
random but real architectures with an offline byte-level tokenizer; they run anywhere in well
under a second.  :func:`prepare_model` resolves a name to its config and processor without
touching weights (a :class:`ModelPlan`), so inputs can be checked first; ``plan.load(...)`` then
builds or reads the weights, which is all :func:`load_model` does.

Example:
    >>> from recipe_compiler.models import load_model
    >>> lm = load_model("tiny-llava")
    >>> lm.format_prompt("What is this?")
    'USER: <image>\\nWhat is this? ASSISTANT:'
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from recipe_compiler.errors import ModelNotFoundError
from recipe_compiler.families import ALIASES, FAMILIES, ModelSpec, config_from_dict, family_of
from recipe_compiler.families.base import image_token_id, pad_token_id
from runtime import hub
from runtime.errors import HubError, HubOfflineError

if TYPE_CHECKING:  # pragma: no cover
    import transformers

__all__ = [
    "REGISTRY",
    "LoadedModel",
    "ModelPlan",
    "ModelSpec",
    "build_random",
    "build_tiny",
    "build_tiny_llava",
    "build_tiny_llava_next",
    "build_tiny_qwen2_5_vl",
    "build_tiny_qwen2_vl",
    "load_model",
    "parse_dtype",
    "prepare_model",
    "resolve_spec",
]

REGISTRY = ALIASES
"""alias → :class:`ModelSpec`: every family's aliases (:mod:`recipe_compiler.families`)."""

TINY_ALIAS = "tiny-llava"
"""The built-in default model."""


def resolve_spec(name: str) -> ModelSpec | None:
    """Look a name up in the registry.

    Args:
        name: A registry alias, compared case-insensitively and ignoring surrounding spaces.

    Returns:
        The :class:`ModelSpec`, or ``None`` when ``name`` is not an alias (hub ids and directories
        are not aliases; :func:`load_model` handles those).

    Example:
        >>> resolve_spec("LLaVA-1.5-7B").hub_id
        'llava-hf/llava-1.5-7b-hf'
        >>> resolve_spec("llava-hf/llava-1.5-7b-hf") is None
        True
    """
    if not isinstance(name, str):
        return None
    return REGISTRY.get(name.strip().lower())


def _spec_for_hub_id(repo_id: str) -> ModelSpec | None:
    for spec in REGISTRY.values():
        if spec.hub_id is not None and spec.hub_id.lower() == repo_id.lower():
            return spec
    return None


# --------------------------------------------------------------------------------------------
# Loaded model
# --------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A ready-to-run model with its processor.

    Attributes:
        model: ``LlavaForConditionalGeneration`` in eval mode with gradients off.
        processor: ``LlavaProcessor``: ``processor(images=[...], text=[...], return_tensors="pt",
            padding=True)`` gives ``input_ids`` / ``attention_mask`` / ``pixel_values`` with each
            ``<image>`` expanded to the model's number of image tokens, left padded.
        spec: The registry entry, or ``None`` for a hub id / directory not in the registry.
        name: What the user passed.
        source: Where the weights (and processor) came from, for logs and reports.
    """

    model: "transformers.PreTrainedModel"
    processor: "transformers.ProcessorMixin"
    spec: ModelSpec | None
    name: str
    source: str

    def format_prompt(self, prompt: str) -> str:
        """Wrap a user question in the model's prompt template.

        Args:
            prompt: The question, without any ``<image>`` placeholder.

        Returns:
            The full prompt with one image placeholder (the spec's template, else its family's).

        Example:
            >>> build_tiny_llava().format_prompt("Hi?")
            'USER: <image>\\nHi? ASSISTANT:'
        """
        return _prompt_template(self.spec, self.model.config).replace("{prompt}", prompt)

    @property
    def image_token_id(self) -> int:
        """Id of the image placeholder token in ``input_ids``."""
        return image_token_id(self.model.config)


# --------------------------------------------------------------------------------------------
# dtype
# --------------------------------------------------------------------------------------------

_DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def parse_dtype(dtype: "torch.dtype | str") -> torch.dtype:
    """Turn a dtype option into a ``torch.dtype``.

    Args:
        dtype: A floating ``torch.dtype`` or one of ``float32``/``fp32``/``float16``/``fp16``/
            ``bfloat16``/``bf16`` (case-insensitive, an optional ``torch.`` prefix is allowed).

    Returns:
        The ``torch.dtype``.

    Raises:
        ValueError: For anything else; the message lists the choices.

    Example:
        >>> parse_dtype("bf16")
        torch.bfloat16
    """
    choices = ", ".join(_DTYPE_NAMES)
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype {dtype} is not a floating-point type; use one of: {choices}")
        return dtype
    if isinstance(dtype, str):
        key = dtype.strip().lower()
        if key.startswith("torch."):
            key = key[len("torch.") :]
        if key in _DTYPE_NAMES:
            return _DTYPE_NAMES[key]
    raise ValueError(f"unknown dtype {dtype!r}; use one of: {choices}")


# --------------------------------------------------------------------------------------------
# Processors (each family builds its own; the loader only picks and repairs them)
# --------------------------------------------------------------------------------------------


def _builtin_processor(config: Any) -> Any:
    """The family's processor with the built-in tokenizer, sized from the model config."""
    return family_of(config).processor(config)


def _saved_processor(directory: Path, config: Any) -> Any:
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        try:  # e.g. Qwen2-VL's processor insists on a video processor, which needs torchvision
            loaded = family_of(config).saved_processor(directory, config)
        except Exception:  # noqa: BLE001 - report AutoProcessor's reason, the usual one
            raise exc from None
        if loaded is None:
            raise
        return loaded


def _fix_processor(processor: Any, config: Any) -> Any:
    """Make a loaded processor expand the image placeholder and left-pad, whatever its saved config said."""
    return family_of(config).fix_processor(processor, config)


# --------------------------------------------------------------------------------------------
# Building / loading
# --------------------------------------------------------------------------------------------

# Below this fp32 size a random model is built in fp32 and then cast, so its weights are the same
# numbers in every dtype; above it, it is built directly in the target dtype to save memory.
_BUILD_FP32_LIMIT_BYTES = 2 * 1024**3


def _finalize(model: Any, attn_implementation: str) -> Any:
    try:
        model.set_attn_implementation(attn_implementation)
    except Exception:  # noqa: BLE001 - loading already validated it; keep the loaded choice
        pass
    model.eval()
    model.requires_grad_(False)
    return model


def _set_generation_ids(model: Any, config: Any, tokenizer: Any | None, *, override: bool = True) -> None:
    """Give ``generate`` the tokenizer's bos/eos/pad ids (only the missing ones unless ``override``)."""
    gen = getattr(model, "generation_config", None)
    if gen is None:
        return
    ids = {"pad_token_id": pad_token_id(config)}
    if tokenizer is not None:
        ids = {
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else pad_token_id(config),
        }
    for key, value in ids.items():
        if value is not None and (override or getattr(gen, key, None) is None):
            setattr(gen, key, value)


def _model_class(config: Any) -> Any:
    """The ``…ForConditionalGeneration`` class of a supported family's config."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText._model_mapping[type(config)]


def _random_model(config: Any, *, device: str, dtype: torch.dtype, attn_implementation: str, seed: int) -> Any:
    """Build the family's ``…ForConditionalGeneration(config)`` with seeded random weights.

    ``device="meta"`` builds shapes only (no memory, no init).  Small models are initialised in
    fp32 and cast so that the same seed gives the same numbers in every dtype.
    """
    model_class = _model_class(config)
    torch_device = torch.device(device)
    with torch.device("meta"):
        shell = model_class._from_config(
            config, attn_implementation=attn_implementation, dtype=dtype
        )
    if torch_device.type == "meta":
        return shell
    n_params = sum(p.numel() for p in shell.parameters())
    del shell
    build_dtype = torch.float32 if n_params * 4 <= _BUILD_FP32_LIMIT_BYTES else dtype
    fork_devices = [torch_device.index or 0] if torch_device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        with torch_device:
            model = model_class._from_config(
                config, attn_implementation=attn_implementation, dtype=build_dtype
            )
    if build_dtype != dtype:
        model = model.to(dtype=dtype)
    return model


def _shipped_weights(spec: ModelSpec) -> Path:
    """The trained weights file a built-in spec ships (``ModelNotFoundError`` when it is missing)."""
    path = Path(__file__).resolve().parent / spec.weights
    if not path.is_file():
        raise ModelNotFoundError(
            f"built-in model '{spec.alias}': its trained weights {path} are missing; reinstall the package "
            "or re-export them (python -m recipe_compiler.testbed.train --export)"
        )
    return path


def _load_shipped(model: Any, path: Path) -> None:
    """Read shipped weights (stored fp16) into ``model`` in its own dtype; every tensor must match."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        raise ModelNotFoundError(f"trained weights {path} do not fit the model: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for key, value in state.items():
            own[key].copy_(value.to(own[key].dtype))


def build_tiny(name: str = TINY_ALIAS, seed: int = 0, attn_implementation: str = "sdpa") -> LoadedModel:
    """Build a built-in tiny model (random, seeded) on CPU in fp32: ``load_model(name, ...)``.

    Args:
        name: a built-in alias (``tiny-llava``, ``tiny-llava-next``, ``tiny-qwen2-vl``, ``tiny-qwen2.5-vl``, …).
        seed: Seed for ``torch.manual_seed`` before construction; the same seed gives bit-identical
            weights in every process.  The caller's RNG state is left untouched.
        attn_implementation: ``"sdpa"`` or ``"eager"``.

    Example:
        >>> build_tiny("tiny-llava-next").model.config.model_type
        'llava_next'
    """
    return load_model(name, seed=seed, attn_implementation=attn_implementation)


def build_tiny_llava(seed: int = 0, attn_implementation: str = "sdpa") -> LoadedModel:
    """The built-in ``tiny-llava`` (576 visual tokens per 96-px image, byte-level tokenizer); see :func:`build_tiny`.

    Example:
        >>> build_tiny_llava(seed=0).model.config.text_config.num_hidden_layers
        8
    """
    return build_tiny("tiny-llava", seed, attn_implementation)


def build_tiny_llava_next(seed: int = 0, attn_implementation: str = "sdpa") -> LoadedModel:
    """The built-in ``tiny-llava-next`` (a 64x64 image gives 320 visual tokens + 16 newlines); see :func:`build_tiny`."""
    return build_tiny("tiny-llava-next", seed, attn_implementation)


def build_tiny_qwen2_vl(seed: int = 0, attn_implementation: str = "sdpa") -> LoadedModel:
    """The built-in ``tiny-qwen2-vl``; see :func:`build_tiny`."""
    return build_tiny("tiny-qwen2-vl", seed, attn_implementation)


def build_tiny_qwen2_5_vl(seed: int = 0, attn_implementation: str = "sdpa") -> LoadedModel:
    """The built-in ``tiny-qwen2.5-vl`` (same tokenizer as tiny-qwen2-vl); see :func:`build_tiny`."""
    return build_tiny("tiny-qwen2.5-vl", seed, attn_implementation)


def _known_aliases() -> str:
    return ", ".join(sorted(REGISTRY))


_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9_.\-]+$")


def _is_hub_id(name: str) -> bool:
    return bool(_HUB_ID_RE.match(name)) and ".." not in name and not name.endswith((".", "-"))


def _hub_offline() -> bool:
    return hub.offline()


def _repo_cache_folder(repo_id: str) -> Path:
    return hub.repo_cache_folder(repo_id)


def _cached_snapshot(repo_id: str, allow_patterns: list[str] | None = None) -> Path | None:
    """The local snapshot folder of ``repo_id`` in the HF cache, or ``None``; never uses the network."""
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(
            repo_id, local_files_only=True, allow_patterns=allow_patterns
        )
    except Exception:  # noqa: BLE001 - not cached (LocalEntryNotFoundError) or unreadable cache
        return None
    path = Path(str(path))
    return path if (path / "config.json").is_file() or allow_patterns else None


_PROCESSOR_PATTERNS = ["*.json", "*.model", "*.txt", "*.jinja"]


def _download_snapshot(repo_id: str, *, weights: bool = True) -> Path | None:
    """Fetch ``repo_id`` from the hub when allowed; ``None`` when the hub cannot be asked (offline, no network).

    ``weights=False`` fetches only the config and processor files.

    Raises:
        HubNotFoundError, HubGatedRepoError, HubAuthError: the hub answered, and refused (one line each).
    """
    if _hub_offline():
        return None
    from huggingface_hub import HfApi, constants, snapshot_download

    timeout = float(getattr(constants, "HF_HUB_ETAG_TIMEOUT", 10))
    try:
        HfApi().model_info(repo_id, timeout=timeout)  # fail fast when the hub is unreachable
        path = snapshot_download(
            repo_id,
            etag_timeout=timeout,
            allow_patterns=_PROCESSOR_PATTERNS + (["*.safetensors"] if weights else []),
        )
    except Exception as exc:  # noqa: BLE001 - a refusal is typed; "cannot ask" means not available
        error = hub.hub_error(exc, repo_id)
        if isinstance(error, HubError) and not isinstance(error, HubOfflineError):
            raise error from None
        return None
    path = Path(str(path))
    return path if (path / "config.json").is_file() else None


def _read_config(directory: Path, what: str) -> Any:
    """AutoConfig from a directory, checked to be a supported family's config."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ModelNotFoundError(
            f"{what}: cannot read config.json in {directory} ({type(exc).__name__}: {_first_line(exc)}); "
            "point --model at a LLaVA checkpoint saved with save_pretrained"
        ) from exc
    if getattr(config, "model_type", None) not in FAMILIES:
        raise ModelNotFoundError(
            f"{what}: {directory} holds a {getattr(config, 'model_type', '?')!r} model, which is not supported "
            f"(supported model types: {', '.join(sorted(FAMILIES))}); use one of {_known_aliases()}"
        )
    return config


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else ""


def _directory_processor(directory: Path, what: str) -> tuple[Any, Any]:
    """(config, processor) of a checkpoint directory (local or a cache snapshot); reads no weights."""
    config = _read_config(directory, what)
    try:
        processor = _saved_processor(directory, config)
    except Exception as exc:  # noqa: BLE001
        raise ModelNotFoundError(
            f"{what}: cannot load the processor (tokenizer + image processor) from {directory} "
            f"({type(exc).__name__}: {_first_line(exc)}); save it there with processor.save_pretrained(dir)"
        ) from exc
    return config, _fix_processor(processor, config)


def _not_found_message(name: str, repo_id: str) -> str:
    label = f"model '{name}' ({repo_id})" if name != repo_id else f"model '{repo_id}'"
    hub = "HF_HUB_OFFLINE is set" if _hub_offline() else "the hub is unreachable"
    return (
        f"{label}: weights not found in the HF cache at {_repo_cache_folder(repo_id)} and {hub}; "
        f"fetch them with `huggingface-cli download {repo_id}` or pass --random-weights to build the "
        "architecture without weights"
    )


def _prompt_template(spec: ModelSpec | None, config: Any) -> str:
    """The spec's template, else its family's (a hub id or directory outside the registry)."""
    if spec is not None and spec.prompt_template:
        return spec.prompt_template
    return family_of(config).prompt_template


@dataclass
class ModelPlan:
    """A model name resolved to its config and processor, before any weight is read or built.

    :func:`prepare_model` makes one in a fraction of a second, so the inputs can be checked
    against the processor and the config's positions (:func:`recipe_compiler.collect.check_prompts`)
    before :meth:`load` spends model time. ``load_model(name, ...)`` is
    ``prepare_model(name, ...).load(...)``.

    Attributes:
        name: What the user passed.
        spec: The registry entry, or ``None`` for a hub id / directory outside the registry.
        config: The transformers config (an alias's embedded one, else the checkpoint's ``config.json``).
        processor: The processor the loaded model will use (ready, left padding).
        kind: ``"built-in"`` (tiny models), ``"random"`` (an alias's architecture, random weights),
            ``"local"`` (a checkpoint directory) or ``"hub"`` (a hub id's cache snapshot).
        checkpoint: The directory whose weights :meth:`load` reads (``"local"`` / ``"hub"``).
        random_weights: Build random weights instead of reading the checkpoint's.
        origin: Where the config and processor came from, for :attr:`LoadedModel.source`.
        fetch_weights: A hub id whose weights :meth:`load` still has to download (only the config
            and processor were fetched), else ``None``.
    """

    name: str
    spec: ModelSpec | None
    config: Any
    processor: Any
    kind: str
    checkpoint: Path | None = None
    random_weights: bool = False
    origin: str = ""
    fetch_weights: str | None = None

    def format_prompt(self, prompt: str) -> str:
        """The user prompt in the model's template, as :meth:`LoadedModel.format_prompt` gives it."""
        return _prompt_template(self.spec, self.config).replace("{prompt}", prompt)

    @property
    def max_positions(self) -> int | None:
        """The language model's ``max_position_embeddings`` (``None`` when the config has none)."""
        text = getattr(self.config, "text_config", None) or self.config
        value = getattr(text, "max_position_embeddings", None)
        return int(value) if value else None

    def load(
        self,
        *,
        device: str = "cpu",
        dtype: "torch.dtype | str" = "float32",
        attn_implementation: str = "sdpa",
        seed: int = 0,
        device_map: "str | dict | None" = None,
    ) -> LoadedModel:
        """Build or read the weights: the :class:`LoadedModel` (arguments as for :func:`load_model`).

        Raises:
            ModelNotFoundError: the checkpoint's weights are missing or unreadable, or cannot be fetched.
            HubGatedRepoError, HubAuthError, HubNotFoundError: the hub refused a hub id (runtime.errors).
            ValueError: bad ``dtype``, or a ``device_map`` for built weights or without accelerate.

        Example:
            >>> plan = prepare_model("tiny-llava")
            >>> plan.load(seed=0).model.config.text_config.num_hidden_layers
            8
        """
        torch_dtype = parse_dtype(dtype)
        built = self.kind in ("built-in", "random") or self.random_weights
        if device_map is not None:
            _check_device_map(built)
        kwargs = dict(device=device, dtype=torch_dtype, attn_implementation=attn_implementation, seed=seed)
        tokenizer = getattr(self.processor, "tokenizer", None)
        if self.kind in ("built-in", "random"):
            model = _random_model(self.config, **kwargs)
            _set_generation_ids(model, model.config, tokenizer)
            alias = self.spec.alias
            source = (f"built-in {alias} (random, seed {seed})" if self.kind == "built-in"
                      else f"random weights ({alias} architecture, seed {seed}); {self.origin}")
            if self.kind == "built-in" and self.spec.weights is not None and torch.device(device).type != "meta":
                path = _shipped_weights(self.spec)
                _load_shipped(model, path)
                source = f"built-in {alias} (trained weights {path.name})"
        else:
            if self.random_weights or torch.device(device).type == "meta":
                model = _random_model(self.config, **kwargs)
            else:
                model = self._read_weights(torch_dtype, attn_implementation, device, device_map)
            _set_generation_ids(model, model.config, tokenizer, override=self.random_weights)
            source = f"random weights (seed {seed}), config from {self.origin}" if self.random_weights else self.origin
        return LoadedModel(_finalize(model, attn_implementation), self.processor, self.spec, self.name, source)

    def _read_weights(self, dtype: torch.dtype, attn_implementation: str, device: str, device_map: Any) -> Any:
        what = f"model '{self.name}'"
        directory = self.checkpoint
        if self.fetch_weights is not None:  # only the config and processor were downloaded so far
            directory = _download_snapshot(self.fetch_weights, weights=True)
            if directory is None:
                raise ModelNotFoundError(_not_found_message(self.name.strip(), self.fetch_weights))
        try:
            model = _model_class(self.config).from_pretrained(
                str(directory),
                local_files_only=True,
                dtype=dtype,
                attn_implementation=attn_implementation,
                **({} if device_map is None else {"device_map": device_map}),
            )
        except OSError as exc:
            raise ModelNotFoundError(
                f"{what}: weights in {directory} are missing or unreadable ({_first_line(exc)}); "
                "re-download them or pass --random-weights to build the architecture without weights"
            ) from exc
        if device_map is None and torch.device(device) != torch.device("cpu"):
            model = model.to(device)
        return model


def prepare_model(name: str, *, random_weights: bool = False) -> ModelPlan:
    """Resolve a model name to its config and processor, reading no weights (see :class:`ModelPlan`).

    Resolution is :func:`load_model`'s: (1) a registry alias (``tiny-llava`` is built in; with
    ``random_weights`` an alias needs only its embedded config and, optionally, a cached
    processor); (2) an existing local directory with ``config.json``; (3) a hub id, from the local
    HF cache, else (only when ``HF_HUB_OFFLINE`` is not set) its config and processor files from
    the hub; its weights are fetched by :meth:`ModelPlan.load`.

    Args:
        name: Alias, local directory or hub id.
        random_weights: The plan builds random weights instead of reading them.

    Returns:
        A :class:`ModelPlan`.

    Raises:
        ModelNotFoundError: Unknown name, not cached (and unreachable), no config or processor,
            or a non-supported checkpoint.
        HubGatedRepoError, HubAuthError, HubNotFoundError: the hub refused a hub id (runtime.errors).

    Example:
        >>> plan = prepare_model("tiny-llava")
        >>> plan.max_positions, plan.format_prompt("Hi?")
        (1024, 'USER: <image>\\nHi? ASSISTANT:')
    """
    if not isinstance(name, str) or not name.strip():
        raise ModelNotFoundError(f"empty model name; pass one of {_known_aliases()}, a hub id or a local directory")
    name_clean = name.strip()
    spec = resolve_spec(name_clean)

    # (1) built-in tiny model
    if spec is not None and spec.hub_id is None:
        config = config_from_dict(spec.config)
        return ModelPlan(name, spec, config, family_of(config).builtin_processor(spec, config), kind="built-in")

    # (1b) alias with random weights: the embedded config, no weights read
    if spec is not None and random_weights:
        return _random_plan(spec, name)

    # (2) local directory
    if spec is None:
        path = Path(name_clean).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelNotFoundError(
                    f"model '{name}': directory {path} has no config.json; point --model at a checkpoint "
                    f"saved with save_pretrained, a hub id, or one of {_known_aliases()}"
                )
            resolved = path.resolve()
            config, processor = _directory_processor(resolved, f"model '{name}'")
            return ModelPlan(name, None, config, processor, kind="local", checkpoint=resolved, random_weights=random_weights,
                             origin=f"local directory {resolved}")
        if path.exists():
            raise ModelNotFoundError(
                f"model '{name}': {path} is a file, not a checkpoint directory; pass a directory with config.json, "
                f"a hub id, or one of {_known_aliases()}"
            )
        if not _is_hub_id(name_clean):
            raise ModelNotFoundError(
                f"unknown model '{name}': not a known alias ({_known_aliases()}), an existing directory, "
                "or a hub id like org/name; pick an alias or pass a checkpoint directory"
            )

    # (3) hub id, from the HF cache (or the hub when reachable)
    repo_id = spec.hub_id if spec is not None else name_clean
    if spec is None:
        spec = _spec_for_hub_id(repo_id)
        if spec is not None and random_weights:  # a registered hub id: its embedded config suffices
            return _random_plan(spec, name)
    snapshot = _cached_snapshot(repo_id)
    origin, fetch = f"HF cache {_repo_cache_folder(repo_id)}", None
    if snapshot is None:
        snapshot = _download_snapshot(repo_id, weights=False)  # config and processor; load() fetches the weights
        origin = f"HF hub {repo_id} (downloaded to {_repo_cache_folder(repo_id)})"
        fetch = None if random_weights else repo_id
    if snapshot is None:
        if random_weights:
            raise ModelNotFoundError(
                f"model '{name}': --random-weights needs a config, but {repo_id} is neither a registry alias "
                f"({_known_aliases()}) nor cached at {_repo_cache_folder(repo_id)}; use an alias or fetch the config "
                f"with `huggingface-cli download {repo_id} config.json`"
            )
        raise ModelNotFoundError(_not_found_message(name_clean, repo_id))
    config, processor = _directory_processor(snapshot, f"model '{name}'")
    return ModelPlan(name, spec, config, processor, kind="hub", checkpoint=snapshot, random_weights=random_weights,
                     origin=origin, fetch_weights=fetch)


def load_model(
    name: str,
    *,
    random_weights: bool = False,
    device: str = "cpu",
    dtype: "torch.dtype | str" = "float32",
    attn_implementation: str = "sdpa",
    seed: int = 0,
    device_map: "str | dict | None" = None,
) -> LoadedModel:
    """Load (or build) a LLaVA model and its processor: ``prepare_model(name).load(...)``.

    Resolution order: (1) a registry alias (case-insensitive; ``tiny-llava`` is always built in);
    (2) an existing local directory with ``config.json``; (3) a hub id ``org/name`` (an alias
    maps to its hub id), looked up in the local HF cache, then on the hub only when
    ``HF_HUB_OFFLINE`` is not set (short timeout; unreachable counts as not cached, a refusal is a typed HubError).

    Args:
        name: Alias, local directory or hub id.
        random_weights: Build the architecture with seeded random weights instead of loading them.
            For an alias this reads nothing but (optionally) a cached processor; without one, the
            built-in byte-level tokenizer is used and ``source`` says so.
        device: A torch device string; ``"meta"`` builds shapes only (no weights, no init).
        dtype: ``torch.dtype`` or ``float32``/``fp32``/``float16``/``fp16``/``bfloat16``/``bf16``.
        attn_implementation: ``"sdpa"`` or ``"eager"`` (anything transformers accepts).
        seed: Seed for random weights (``tiny-llava`` and ``random_weights=True``).
        device_map: passed to ``from_pretrained(device_map=...)`` (``"auto"``, a dict…) to spread
            a checkpoint over devices; needs ``accelerate``; ``device`` is then not used.

    Returns:
        A :class:`LoadedModel` in eval mode with gradients off.

    Raises:
        ModelNotFoundError: Unknown name, missing weights, or a non-LLaVA checkpoint.
        HubGatedRepoError, HubAuthError, HubNotFoundError: the hub refused a hub id (runtime.errors).
        ValueError: Bad ``dtype``.

    Example:
        >>> lm = load_model("tiny-llava", dtype="fp32")
        >>> lm.source
        'built-in tiny-llava (random, seed 0)'
        >>> load_model("llava-1.5-7b", random_weights=True, device="meta").model.device.type
        'meta'
    """
    torch_dtype = parse_dtype(dtype)  # a bad dtype is refused before anything is read
    return prepare_model(name, random_weights=random_weights).load(
        device=device, dtype=torch_dtype, attn_implementation=attn_implementation, seed=seed, device_map=device_map
    )


def _check_device_map(built: bool) -> None:
    """A device map needs a checkpoint loaded from disk and accelerate; say so in one line."""
    if built:
        raise ValueError(
            "--device-map applies to weights loaded from a checkpoint (a local directory or a cached hub id); "
            "built-in and --random-weights models are built on --device"
        )
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise ValueError(
            "--device-map needs accelerate, which is not installed; pip install 'recipe-compiler[big]' (or pip install accelerate)"
        ) from None


def _random_plan(spec: ModelSpec, name: str) -> ModelPlan:
    """Random weights for a real alias; its cached processor when there is one, else the built-in one."""
    config = config_from_dict(spec.config)
    processor = None
    proc_note = ""
    hub_id = spec.hub_id or spec.alias
    snapshot = _cached_snapshot(hub_id, allow_patterns=_PROCESSOR_PATTERNS)
    if snapshot is not None and any(snapshot.glob("tokenizer*")):
        try:
            processor = _fix_processor(_saved_processor(snapshot, config), config)
            proc_note = f"processor from HF cache {_repo_cache_folder(hub_id)}"
        except Exception:  # noqa: BLE001 - fall back to the built-in processor
            processor = None
    if processor is None:
        processor = _builtin_processor(config)
        proc_note = f"built-in byte-level tokenizer (not the real {hub_id} tokenizer)"
    return ModelPlan(name, spec, config, processor, kind="random", random_weights=True, origin=proc_note)


def build_random(
    spec: ModelSpec, *, device: str = "cpu", dtype: "torch.dtype | str" = "float32",
    attn_implementation: str = "sdpa", seed: int = 0,
) -> LoadedModel:
    """Build any :class:`ModelSpec`'s architecture with seeded random weights (no disk, no network).

    For benchmarks at real shapes (shapes, not weights, set the speed) and for specs that are not
    in the registry.

    Args:
        spec: the architecture (``spec.config`` is a LlavaConfig dict).
        device, dtype, attn_implementation, seed: as for :func:`load_model`.

    Returns:
        A :class:`LoadedModel` with the built-in tokenizer unless a processor is cached.

    Example:
        >>> m = build_random(REGISTRY["tiny-llava"])
        >>> m.model.config.text_config.num_hidden_layers
        8
    """
    return _random_plan(spec, spec.alias).load(
        device=device, dtype=parse_dtype(dtype), attn_implementation=attn_implementation, seed=seed
    )


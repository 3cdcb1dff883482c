"""The recipe: a per-layer visual-token schedule plus its provenance, stored as safetensors.

Numbers live in tensors (``keep_ratio`` float32 [L], ``keep_count`` int32 [L]); provenance lives in
``__metadata__`` strings (JSON where nested). Files are written with sorted keys and no timestamps,
so the same recipe always gives the same bytes, and atomically (temp file + rename), so a reader
never sees half a file. Reading validates the header size before reading anything else, then every
field, and raises :class:`RecipeError` naming what is wrong.
"""
from __future__ import annotations

import errno
import json
import math
import re
import os
import stat
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import RecipeError, RecipeMismatchError, UnsupportedModelError
from .validation import is_int as _is_int, is_number as _is_number, short as _short

SCHEMA = "1"
FINGERPRINT_FIELDS = ("model_type", "num_layers", "hidden_size", "num_heads", "num_kv_heads", "visual_tokens", "config_hash")

_MAX_HEADER_BYTES = 1 << 20  # a schema-1 header is a few KiB; anything near this is not ours
_MAX_LAYERS = 1024
_MAX_FINGERPRINT_INT = 2**31 - 1  # counts are int32 on disk; no real model is near this
_DTYPES = {"F32": (np.dtype("<f4"), 4), "I32": (np.dtype("<i4"), 4)}
_META_PREFIX = "recipe_compiler."


@dataclass(frozen=True)
class Recipe:
    """A compiled pruning recipe for one model architecture.

    Attributes:
        keep_count: int [L]. Visual tokens alive entering each decoder layer, for an image with
            ``fingerprint["visual_tokens"]`` tokens. ``keep_count[0]`` is that full count.
        scorer: which visual tokens go at a pruning layer, a :data:`runtime.methods.scorers.SCORERS`
            name ("fitprune", "text-mean", "last-token").
        fingerprint: the model facts the recipe was compiled for (see :mod:`runtime.families`).
        head_reduce: how attention heads are combined when scoring, a
            :data:`runtime.methods.heads.HEAD_REDUCTIONS` name ("max" as FitPrune, or "mean");
            default (None): the scorer's own (:attr:`Scorer.head_reduce`: last-token → mean).
        pre_llm: the pre-LLM stage (tokens dropped on entry to layer 0; a
            :data:`runtime.methods.stages.STAGES` name, whose module validates its fields), a JSON-able dict:
            ``{"method": "none"}``; ``{"method": "g-prune", "keep_ratio": r, "params":
            {"threshold": s, "temperature": τ, "steps": t}}``; ``{"method": "fopru-rank" |
            "fopru-row", "keep_ratio": r, "params": {"feature_layer": i}}`` (optional; the vision
            layer whose attention FoPru reads); or ``{"method": "cls-inflection", "params":
            {"stage2_layer": K, "stage2_ratio": ρ, "inflection_detector": "kneedle" |
            "max-curvature"}}`` (detector optional, default kneedle; a per-image count at the knee,
            then stage 2: at layer ``K`` keep the fraction ``ρ`` of the survivors by the
            ``text-mean`` scorer; stage 2 *is* the in-LLM schedule, so ``keep_count`` must be
            ``v`` before ``K`` and ``round_half_up(ρ·v)`` from ``K`` on, and the scorer
            ``text-mean``). With a stage, ``keep_count`` is relative to the tokens that survive it:
            a row keeps ``round_half_up(keep_count · n_survivors / v)``.
        provenance: budget, achieved FLOPs fraction, divergence, search method and parameters,
            calibration fingerprint, package versions. Informational; never drives pruning, except
            the budget under ``apply(model, strict_budget=True)``.

    Example:
        >>> r = Recipe.keep_all({"model_type": "llava", "num_layers": 2, "hidden_size": 8, "num_heads": 2,
        ...                      "num_kv_heads": 2, "visual_tokens": 4, "config_hash": "0" * 16})
        >>> r.keep_ratio.tolist()
        [1.0, 1.0]
    """

    keep_count: np.ndarray
    scorer: str
    fingerprint: dict
    head_reduce: str | None = None
    pre_llm: dict = field(default_factory=lambda: {"method": "none"})
    provenance: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "keep_count", np.asarray(self.keep_count, dtype=np.int32).copy())
        if self.head_reduce is None:  # the scorer's own reduction is part of its definition
            from .methods.scorers import SCORERS

            if self.scorer in SCORERS:
                object.__setattr__(self, "head_reduce", SCORERS[self.scorer].head_reduce)
        _validate(self)

    @classmethod
    def keep_all(cls, fingerprint: dict, scorer: str = "fitprune", **kwargs: Any) -> "Recipe":
        """A recipe that prunes nothing (the model must behave exactly as unpatched)."""
        counts = np.full(int(fingerprint["num_layers"]), int(fingerprint["visual_tokens"]), dtype=np.int32)
        return cls(keep_count=counts, scorer=scorer, fingerprint=dict(fingerprint), **kwargs)

    @property
    def num_layers(self) -> int:
        return int(self.keep_count.shape[0])

    @property
    def reference_visual_tokens(self) -> int:
        return int(self.fingerprint["visual_tokens"])

    @property
    def keep_ratio(self) -> np.ndarray:
        """float32 [L]: fraction of an image's visual tokens alive entering each layer."""
        return (self.keep_count.astype(np.float64) / self.reference_visual_tokens).astype(np.float32)

    def keep_counts_for(self, n_visual: int) -> np.ndarray:
        """Per-layer keep counts for an image with ``n_visual`` tokens (ratios scale other sizes).

        Args:
            n_visual: the image's visual-token count at the language model's input.

        Returns:
            int64 [L], non-increasing, ``[0] == n_visual``; ``round_half_up(keep_count · n_visual / visual_tokens)``.
        """
        # round_half_up(keep · n / v_ref) in integers: exactly what the compiler planned with.
        v_ref = self.reference_visual_tokens
        return (2 * self.keep_count.astype(np.int64) * int(n_visual) + v_ref) // (2 * v_ref)

    @property
    def pruning_layers(self) -> list[int]:
        """Layers on whose entry visual tokens are dropped (keep count falls)."""
        return [int(l) for l in np.nonzero(np.diff(self.keep_count) < 0)[0] + 1]

    def check_model(self, model: Any) -> None:
        """Raise :class:`RecipeMismatchError` naming the first field where ``model`` differs.

        Raises:
            UnsupportedModelError: (a :class:`RecipeMismatchError`) the runtime cannot prune this
                model at all: its family is not supported (the message lists the supported model
                types), or its decoder layers are of kinds the pruner does not handle.
            RecipeMismatchError: the recipe was compiled for another model, or its pre-LLM stage
                does not fit this one.
        """
        from .families import family_for
        from .methods.stages import NO_STAGE, STAGES

        try:
            family = family_for(model)
            family.check(model)
            actual = family.fingerprint(model)
        except UnsupportedModelError as exc:
            raise UnsupportedModelError(f"recipe was compiled for {_short(self.fingerprint['model_type'])}: {exc}") from None
        for key in FINGERPRINT_FIELDS:
            if actual[key] != self.fingerprint[key]:
                raise RecipeMismatchError(
                    f"recipe does not fit this model: {key} is {_short(self.fingerprint[key])} in the recipe "
                    f"but {actual[key]!r} in the model; compile a recipe for this model"
                )
        if self.pruning_layers:
            from .methods.scorers import SCORERS

            reason = SCORERS[self.scorer].unsupported_reason(model)
            if reason:
                raise RecipeMismatchError(f"recipe's scorer {self.scorer!r} cannot run on this model: {reason}")
        method = (self.pre_llm or {}).get("method", NO_STAGE)
        if method != NO_STAGE:
            from . import prellm_stage

            try:
                prellm_stage.check_supported(model, method)
                STAGES[method].check_model(model, self.pre_llm.get("params", {}))
            except ValueError as exc:
                raise RecipeMismatchError(f"recipe's pre-LLM stage does not fit this model: {exc}") from None

    def apply(self, model: Any, **options: Any) -> "PruningHandle":  # noqa: F821
        """Patch ``model`` (a stock HF VLM) to prune visual tokens per this recipe.

        Hooks only: no forward is replaced and no weight changes. ``handle.remove()`` (or leaving
        ``with recipe.apply(model):``) restores the model exactly.

        Args:
            model: e.g. ``LlavaForConditionalGeneration``; must match the recipe's fingerprint.
            **options: passed to :class:`runtime.pruner.PruningHandle`: ``strict_budget=True``
                holds the recipe's budget on every request's own FLOPs (scorer probes included)
                by scaling its keep counts down where needed, instead of on the calibration
                average; ``strict_budget=0.3`` holds that budget.

        Returns:
            The :class:`runtime.pruner.PruningHandle`.

        Example:
            >>> handle = load("recipe.safetensors").apply(model)   # doctest: +SKIP
            >>> model.generate(**inputs); handle.remove()           # doctest: +SKIP
            >>> with load("recipe.safetensors").apply(model, strict_budget=True):   # doctest: +SKIP
            ...     model.generate(**inputs)
        """
        from .pruner import PruningHandle

        self.check_model(model)
        return PruningHandle(model, self, **options)

    def to_bytes(self) -> bytes:
        """Serialise to safetensors bytes: sorted keys, no timestamps, so equal recipes give equal bytes."""
        metadata = {
            "format": "pt",
            _META_PREFIX + "schema": SCHEMA,
            _META_PREFIX + "fingerprint": _dumps(self.fingerprint),
            _META_PREFIX + "scorer": self.scorer,
            _META_PREFIX + "head_reduce": self.head_reduce,
            _META_PREFIX + "pre_llm": _dumps(self.pre_llm),
            _META_PREFIX + "provenance": _dumps(self.provenance),
        }
        return encode_safetensors(
            {"keep_count": self.keep_count.astype("<i4"), "keep_ratio": self.keep_ratio.astype("<f4")}, metadata
        )

    def push_to_hub(self, repo_id: str, *, filename: str = "recipe.safetensors", base_model: str | None = None,
                    private: bool | None = None, token: str | None = None, revision: str | None = None,
                    commit_message: str | None = None) -> str:
        """Upload the recipe and a model card to a Hugging Face Hub model repository, in one commit.

        The repository is created when missing. The card (``README.md``) names the model the recipe
        fits, its budget, the verified FLOPs fraction, the fidelity figures and how to apply it;
        ``runtime.load(repo_id)`` then gives back these exact bytes. Needs ``huggingface_hub``
        (imported only here) and a write token (``hf auth login`` or ``HF_TOKEN``, or ``token=``).

        Args:
            repo_id: ``org/name``.
            filename: the recipe's file in the repository.
            base_model: the hub id of the model the recipe was compiled for (the card's ``base_model``).
            private: create the repository private (only when it does not exist yet).
            token: a Hub token; default: the logged-in one.
            revision: the branch to commit to; default: the main branch.
            commit_message: default ``"Add pruning recipe <filename>"``.

        Returns:
            The URL of the commit.

        Raises:
            HubAuthError, HubNotFoundError, HubGatedRepoError, HubOfflineError: one line each.

        Example:
            >>> recipe.push_to_hub("me/llava-1.5-7b-prune-045", base_model="llava-hf/llava-1.5-7b-hf")   # doctest: +SKIP
        """
        from .hub import push

        return push(self, repo_id, filename=filename, base_model=base_model, private=private, token=token,
                    revision=revision, commit_message=commit_message)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the recipe atomically: the file at ``path`` is either the old one or the whole new one.

        Args:
            path: destination file; its directory must exist and be writable.

        Returns:
            The path written.

        Raises:
            RecipeError: the destination cannot be written (the message names it and the OS
                reason), or it exists and is not a regular file (``/dev/null``, a FIFO: replacing
                it would destroy it).
        """
        try:
            return write_atomic(path, self.to_bytes())
        except OSError as exc:
            raise RecipeError(f"cannot write recipe to {path}: {exc.strerror or exc}; choose a writable path") from None


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temp file in the same directory and ``os.replace``.

    At every moment ``path`` holds either its previous content (or nothing) or all of ``data``.
    The temp file is ``.NAME.XXXXXXXX.tmp`` next to ``path``; it is removed on any error, but a
    process killed outright (SIGKILL, power loss) can leave it behind, never under ``path``.

    Args:
        path: destination file; its directory must exist.
        data: the whole content.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        OSError: the directory is missing or not writable, or ``path`` exists and is not a
            regular file (a device such as ``/dev/null``, a FIFO, a socket: replacing it would
            destroy it); no partial file is left behind.

    Example:
        >>> write_atomic("recipe.safetensors", recipe.to_bytes())   # doctest: +SKIP
    """
    path = Path(path)
    kind = special_file_kind(path)
    if kind is not None:
        raise OSError(errno.EINVAL, f"{path} is {kind}, not a regular file (writing would replace it)")
    tmp_name = None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as handle:
            # mkstemp makes the file 0600; give it the mode a plain open() would (0666 less umask).
            os.fchmod(handle.fileno(), 0o666 & ~_umask())
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
        tmp_name = None
        _fsync_directory(path.parent)
    finally:
        if tmp_name is not None and os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return path


def special_file_kind(path: str | os.PathLike) -> str | None:
    """What ``path`` is when it exists and is neither a regular file nor a directory, else ``None``.

    Follows symbolic links (a link to ``/dev/null`` is a device too).

    Returns:
        ``"a character device"``, ``"a block device"``, ``"a FIFO (named pipe)"``, ``"a socket"``,
        ``"a special file"``, or ``None`` (missing, a regular file or a directory).

    Example:
        >>> special_file_kind("/dev/null")
        'a character device'
    """
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):  # missing, a dangling link, a NUL in the path: nothing special to protect
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    for test, kind in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "a special file"


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask would, briefly, for every thread)
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable; best effort (some platforms cannot open a directory).
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load(path: str | os.PathLike, *, filename: str | None = None, revision: str | None = None) -> Recipe:
    """Read and validate a recipe: a local file, or a file of a Hugging Face Hub repository.

    A local path wins when it exists. Otherwise a hub id (``org/name``) is fetched with
    ``huggingface_hub.hf_hub_download`` (imported only then): its cache and offline mode
    (``HF_HUB_CACHE``, ``HF_HUB_OFFLINE=1``) are honoured, so a recipe cached once loads offline.

    Args:
        path: a ``.safetensors`` recipe written by ``recipe-compile`` or :meth:`Recipe.save`, or a
            hub id.
        filename: the file in the hub repository (default ``recipe.safetensors``).
        revision: a branch, tag or commit of the hub repository (default: its main branch).

    Returns:
        The :class:`Recipe`.

    Raises:
        RecipeError: missing, unreadable, not a recipe, an unknown schema, or inconsistent values;
            the message names the file and the problem.
        HubError: (a ``RecipeError``) the Hub could not give the file: ``HubNotFoundError``,
            ``HubGatedRepoError``, ``HubAuthError`` or ``HubOfflineError``, each one line.

    Example:
        >>> recipe = load("recipe.safetensors")          # doctest: +SKIP
        >>> recipe = load("user/llava-recipes", filename="r45.safetensors", revision="v1")   # doctest: +SKIP
        >>> handle = recipe.apply(model)                  # doctest: +SKIP
    """
    if not os.path.lexists(os.fspath(path)) and _is_hub_id(os.fspath(path)):
        from .hub import DEFAULT_FILENAME, download

        path = download(os.fspath(path), filename or DEFAULT_FILENAME, revision=revision)
    elif filename is not None or revision is not None:
        raise RecipeError(
            f"filename= and revision= name a file of a Hub repository, but {os.fspath(path)!r} "
            + ("is a local path" if os.path.lexists(os.fspath(path)) else "is not a hub id (org/name)")
            + "; pass the recipe file itself, or a hub id"
        )
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(path)
        if not stat.S_ISREG(mode):  # a FIFO or device could block or never end
            raise RecipeError(f"recipe path {path} is not a regular file; pass the .safetensors file")
        with open(path, "rb") as handle:
            return from_bytes_stream(handle, os.fstat(handle.fileno()).st_size, source=str(path))
    except FileNotFoundError:
        raise RecipeError(f"recipe file {path} not found; check the path") from None
    except IsADirectoryError:
        raise RecipeError(f"recipe path {path} is a directory; pass the .safetensors file") from None
    except PermissionError:
        raise RecipeError(f"recipe file {path} is not readable (permission denied)") from None
    except (OSError, ValueError) as exc:  # ValueError: e.g. a NUL byte in the path
        if isinstance(exc, RecipeError):
            raise
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise RecipeError(f"recipe file {path} cannot be read: {reason}") from None


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def _is_hub_id(text: str) -> bool:
    """``org/name`` as the Hub spells repository ids; a ``.safetensors`` name is a file that is missing."""
    return bool(_HUB_ID.match(text)) and ".." not in text and not text.endswith((".safetensors", ".", "-"))


def from_bytes(data: bytes, source: str = "<bytes>") -> Recipe:
    """Parse and validate recipe bytes (see :func:`load`)."""
    import io

    return from_bytes_stream(io.BytesIO(data), len(data), source=source)


def from_bytes_stream(stream: Any, size: int, source: str) -> Recipe:
    """Parse and validate a recipe from a binary stream of ``size`` bytes (see :func:`load`).

    Reads at most ``8 + header + data`` bytes, each part only after its length is checked: the
    8-byte header length against ``size`` and a 1 MiB cap, the data section against the tensor
    offsets (which must cover it exactly), so a corrupt or foreign file never makes it allocate
    more than a recipe's worth of memory.

    Args:
        stream: anything with ``read(n)``, positioned at the start of the recipe.
        size: the total byte count of the recipe (the file size).
        source: the file name used in error messages.

    Returns:
        The :class:`Recipe`.

    Raises:
        RecipeError: the bytes are not a valid recipe of this schema.

    Example:
        >>> import io
        >>> data = Recipe.keep_all({"model_type": "llava", "num_layers": 2, "hidden_size": 8, "num_heads": 2,
        ...                         "num_kv_heads": 2, "visual_tokens": 4, "config_hash": "0" * 16}).to_bytes()
        >>> from_bytes_stream(io.BytesIO(data), len(data), "r.safetensors").keep_count.tolist()
        [4, 4]
    """
    def bad(reason: str) -> RecipeError:
        return RecipeError(f"{source} is not a valid recipe: {reason}")

    if size < 8:
        raise bad(f"file is {size} bytes, too short for a safetensors header")
    prefix = stream.read(8)
    if len(prefix) != 8:
        raise bad("file ended early (truncated)")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > _MAX_HEADER_BYTES or header_len > size - 8:
        raise bad(f"header length {header_len} does not fit a {size}-byte recipe file (truncated or not safetensors)")
    raw = stream.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:  # json would keep the last silently: two readers could see two recipes
        raise bad(f"header repeats the key {_short(exc.key)}; a JSON object names each key once") from None
    except (UnicodeDecodeError, ValueError, RecursionError):  # ValueError: also over-long integers
        raise bad("header is not valid JSON") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("no string __metadata__; it was not written by recipe-compiler")
    if metadata.get(_META_PREFIX + "schema") is None:
        raise bad("no recipe_compiler.schema in the metadata; it was not written by recipe-compiler")
    if metadata[_META_PREFIX + "schema"] != SCHEMA:
        raise bad(
            f"schema {_short(metadata[_META_PREFIX + 'schema'])} is not supported (this runtime reads schema {SCHEMA}); "
            "upgrade recipe-compiler or recompile the recipe"
        )

    data_len = size - 8 - header_len
    tensors: dict[str, np.ndarray] = {}
    for name in ("keep_count", "keep_ratio"):
        entry = header.get(name)
        if not isinstance(entry, dict):
            raise bad(f"tensor {name!r} is missing")
        dtype_name, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        expected = "I32" if name == "keep_count" else "F32"
        if dtype_name != expected:
            raise bad(f"tensor {name!r} has dtype {_short(dtype_name)}, expected {expected}")
        if not (isinstance(shape, list) and len(shape) == 1 and _is_int(shape[0]) and 1 <= shape[0] <= _MAX_LAYERS):
            raise bad(f"tensor {name!r} has shape {_short(shape)}, expected [num_layers] with 1..{_MAX_LAYERS} layers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise bad(f"tensor {name!r} has malformed data_offsets {_short(offsets)}")
        begin, end = offsets
        if not (0 <= begin <= end <= data_len) or end - begin != shape[0] * _DTYPES[dtype_name][1]:
            raise bad(f"tensor {name!r} data_offsets {_short(offsets)} do not fit the file (truncated or corrupt)")
        tensors[name] = (begin, end, _DTYPES[dtype_name][0], shape[0])
    extra = sorted(set(header) - {"keep_count", "keep_ratio"})
    if extra:
        raise bad(f"unexpected tensors {_short(extra)} for schema {SCHEMA}")
    # As safetensors requires: the tensors tile the data section, no gap, overlap or trailing bytes.
    spans = sorted((begin, end) for begin, end, _, _ in tensors.values())
    if spans[0][0] != 0 or spans[0][1] != spans[1][0] or spans[1][1] != data_len:
        raise bad(f"the tensors' data_offsets do not tile the {data_len}-byte data section (corrupt or trailing bytes)")

    body = stream.read(data_len)
    if len(body) != data_len:
        raise bad("file ended early (truncated)")
    arrays = {name: np.frombuffer(body[b:e], dtype=dt, count=n).copy() for name, (b, e, dt, n) in tensors.items()}

    def meta_json(key: str) -> Any:
        value = metadata.get(_META_PREFIX + key)
        if value is None:
            raise bad(f"metadata {_META_PREFIX + key} is missing")
        try:  # strict: the writer never emits NaN / Infinity, so a recipe that has them is corrupt
            return json.loads(value, parse_constant=_no_constant, parse_float=_finite_float, object_pairs_hook=_unique_keys)
        except _DuplicateKey as exc:
            raise bad(f"metadata {_META_PREFIX + key} repeats the key {_short(exc.key)}; a JSON object names each key once") from None
        except (ValueError, RecursionError):  # ValueError: also over-long integers
            raise bad(f"metadata {_META_PREFIX + key} is not valid JSON (or holds NaN / Infinity)") from None

    fingerprint, pre_llm, provenance = meta_json("fingerprint"), meta_json("pre_llm"), meta_json("provenance")
    if not isinstance(provenance, dict):
        raise bad("metadata recipe_compiler.provenance is not a JSON object")
    try:
        recipe = Recipe(
            keep_count=arrays["keep_count"],
            scorer=metadata.get(_META_PREFIX + "scorer", ""),
            fingerprint=fingerprint,
            head_reduce=metadata.get(_META_PREFIX + "head_reduce", ""),
            pre_llm=pre_llm,
            provenance=provenance,
        )
    except RecipeError as exc:
        raise bad(str(exc)) from None
    ratio = arrays["keep_ratio"]
    if not np.array_equal(ratio, recipe.keep_ratio):
        raise bad("keep_ratio disagrees with keep_count / visual_tokens (edited or corrupt)")
    return recipe


def _validate(recipe: Recipe) -> None:
    # The method registries import torch; `import runtime` stays light (numpy only) until a recipe is read.
    from .methods.heads import HEAD_REDUCTIONS
    from .methods.scorers import SCORERS

    fp = recipe.fingerprint
    if not isinstance(fp, dict) or any(k not in fp for k in FINGERPRINT_FIELDS):
        missing = [k for k in FINGERPRINT_FIELDS if not isinstance(fp, dict) or k not in fp]
        raise RecipeError(f"fingerprint lacks {missing}")
    for key in FINGERPRINT_FIELDS:
        value = fp[key]
        if key in ("model_type", "config_hash"):
            if not isinstance(value, str) or not value:
                raise RecipeError(f"fingerprint {key} must be a non-empty string, got {_short(value)}")
        elif not _is_int(value) or not 0 < value <= _MAX_FINGERPRINT_INT:
            raise RecipeError(f"fingerprint {key} must be a positive integer below 2**31, got {_short(value)}")
    counts = recipe.keep_count
    if counts.ndim != 1 or counts.shape[0] != fp["num_layers"]:
        raise RecipeError(f"keep_count has {counts.shape[0] if counts.ndim == 1 else counts.shape} entries but the model has {fp['num_layers']} layers")
    v = fp["visual_tokens"]
    if counts.min() < 0 or counts.max() > v:
        raise RecipeError(f"keep_count must lie in [0, {v}], got values {counts.min()}..{counts.max()}")
    if counts[0] != v:
        raise RecipeError(f"keep_count[0] must be {v} (every visual token enters layer 0), got {counts[0]}")
    if np.any(np.diff(counts) > 0):
        layer = int(np.nonzero(np.diff(counts) > 0)[0][0]) + 1
        raise RecipeError(f"keep_count must be non-increasing, but it rises at layer {layer}")
    if recipe.scorer not in SCORERS:
        raise RecipeError(f"scorer {_short(recipe.scorer)} is unknown; this runtime knows {', '.join(SCORERS)}")
    if recipe.head_reduce not in HEAD_REDUCTIONS:
        raise RecipeError(f"head_reduce {_short(recipe.head_reduce)} is unknown; expected one of {', '.join(HEAD_REDUCTIONS)}")
    _validate_pre_llm(recipe)
    _validate_provenance(recipe.provenance)


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list) -> dict:
    """``object_pairs_hook`` that refuses a JSON object naming a key twice."""
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # e.g. 1e999
        raise ValueError(f"{text} overflows a float")
    return value


def _validate_pre_llm(recipe: Recipe) -> None:
    from .methods.stages import NO_STAGE, STAGES

    spec = recipe.pre_llm
    known = (NO_STAGE, *STAGES)
    if not isinstance(spec, dict) or spec.get("method") not in known:
        method = spec.get("method") if isinstance(spec, dict) else spec
        raise RecipeError(f"pre-LLM stage {_short(method)} is not supported by this runtime (knows {', '.join(known)})")
    method = spec["method"]
    stage = None if method == NO_STAGE else STAGES[method]
    allowed = {"method"} if stage is None else {"method", "params"} | ({"keep_ratio"} if stage.fixed_ratio else set())
    extra = sorted(set(spec) - allowed)
    if extra:
        raise RecipeError(f"pre-LLM stage {method!r} has unexpected field(s) {_short(extra)} in pre_llm")
    if stage is None:
        return
    params = spec.get("params", {})
    if not isinstance(params, dict):
        raise RecipeError(f"pre-LLM stage {_short(method)}: pre_llm.params must be an object, got {_short(params)}")
    if stage.fixed_ratio:
        ratio = spec.get("keep_ratio")
        if not _is_number(ratio) or not 0 < ratio <= 1:
            raise RecipeError(f"pre-LLM stage {_short(method)}: pre_llm.keep_ratio must be a number in (0, 1], got {_short(ratio)}")
    stage.validate(params, recipe)


# Upper end of a FLOPs fraction: 1 (keep-all) plus the compiler's floating-point tolerance.
_FLOPS_FRACTION_MAX = 1 + 1e-6


def _number_in(low: float, high: float, *, low_open: bool = False, expected: str = "") -> Any:
    def check(value: Any) -> bool:
        return _is_number(value) and (low < value if low_open else low <= value) and value <= high
    check.expected = expected or f"a number in {'(' if low_open else '['}{low:g}, {high:g}]"
    return check


def _non_negative(value: Any) -> bool:
    return _is_number(value) and value >= 0


_non_negative.expected = "a finite number >= 0"


def _string(value: Any) -> bool:
    return isinstance(value, str) and value != ""


_string.expected = "a non-empty string"


def _object(value: Any) -> bool:
    return isinstance(value, dict)


_object.expected = "a JSON object"


def _head_reduce(value: Any) -> bool:
    from .methods.heads import HEAD_REDUCTIONS  # the registry imports recipe-level helpers: resolve lazily

    return value in HEAD_REDUCTIONS


class _HeadReduceExpected:
    # Read at message time: the registry is filled lazily, and its names are the truth.
    def __str__(self) -> str:
        from .methods.heads import HEAD_REDUCTIONS

        return "one of " + ", ".join(sorted(HEAD_REDUCTIONS))


_head_reduce.expected = _HeadReduceExpected()


def _calibration(value: Any) -> bool:
    if not isinstance(value, dict):
        return False
    samples, fingerprint = value.get("samples", 1), value.get("fingerprint", "x")
    return _is_int(samples) and samples >= 1 and isinstance(fingerprint, str)


_calibration.expected = 'an object {"fingerprint": string, "samples": positive integer}'


def _versions(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(v, str) for v in value.values())


_versions.expected = "an object of package -> version strings"

# What the compiler (and the presets) write into the provenance, and what each must be. Other
# keys are allowed (any JSON value); the provenance never drives pruning, but a file that claims
# nonsense (a budget of "lots", a FLOPs fraction of -3) is corrupt or forged.
PROVENANCE_FIELDS = {
    "budget": _number_in(0, 1, low_open=True),
    "flops_fraction": _number_in(0, _FLOPS_FRACTION_MAX, expected="a number in [0, 1] (1 + 1e-6 allows for rounding)"),
    "divergence": _non_negative,
    "kl": _non_negative,
    "top1_agreement": _number_in(0, 1),
    "search": _string,
    "search_params": _object,
    "head_reduce": _head_reduce,
    "calibration": _calibration,
    "versions": _versions,
    "source": _string,
}


def _validate_provenance(provenance: Any) -> None:
    if not isinstance(provenance, dict):
        raise RecipeError(f"provenance must be a JSON object, got {_short(provenance)}")
    try:  # what the file holds (numpy scalars become numbers); NaN, infinities, objects are refused
        as_json = json.loads(_dumps(provenance))
    except TypeError as exc:
        raise RecipeError(f"provenance is not JSON ({exc}); use strings, finite numbers, lists and objects") from None
    except ValueError:
        raise RecipeError("provenance holds NaN or an infinite number, which JSON cannot carry") from None
    for key, check in PROVENANCE_FIELDS.items():
        if key in as_json and not check(as_json[key]):
            raise RecipeError(f"provenance {key} must be {check.expected}, got {_short(as_json[key])}")


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False, default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


_SAFETENSORS_DTYPES = {
    "f2": "F16", "f4": "F32", "f8": "F64", "i1": "I8", "i2": "I16", "i4": "I32", "i8": "I64",
    "u1": "U8", "u2": "U16", "u4": "U32", "u8": "U64", "b1": "BOOL",
}


def encode_safetensors(arrays: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """Safetensors bytes that depend only on the arrays and the metadata: the same input, the same bytes.

    The safetensors library writes ``__metadata__`` in hash order, which differs from run to run;
    here the metadata keys are sorted, and the tensors are laid out by descending item size, then
    name (so every tensor stays aligned to its item size, as the library does), little-endian.

    Args:
        arrays: name -> numpy array (float16/32/64, int8..64, uint8..64 or bool).
        metadata: string -> string.

    Returns:
        A complete safetensors file.

    Example:
        >>> data = encode_safetensors({"x": np.zeros(3, np.float32)}, {"b": "2", "a": "1"})
        >>> data == encode_safetensors({"x": np.zeros(3, np.float32)}, {"a": "1", "b": "2"})
        True
    """
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    little = {name: np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<")) for name, value in arrays.items()}
    offset, blobs = 0, []
    for name in sorted(little, key=lambda n: (-little[n].dtype.itemsize, n)):
        value = little[name]
        code = _SAFETENSORS_DTYPES.get(f"{value.dtype.kind}{value.dtype.itemsize}")
        if code is None:
            raise TypeError(f"array {name} has dtype {value.dtype}, which safetensors cannot hold")
        blob = value.tobytes()
        header[name] = {"dtype": code, "shape": list(value.shape), "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    raw = json.dumps(header, separators=(",", ":"), sort_keys=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
    return struct.pack("<Q", len(raw)) + raw + b"".join(blobs)

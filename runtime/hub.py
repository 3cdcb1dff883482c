"""Recipes on the Hugging Face Hub: download through ``huggingface_hub``, errors typed, one line.

``huggingface_hub`` is imported inside the functions, never at module level: ``import runtime`` stays
lean, and only a hub id pays for it. The cache directory and offline mode are huggingface_hub's own
(``HF_HUB_CACHE`` / ``HF_HOME``, ``HF_HUB_OFFLINE``), read as that library reads them.

Example:
    >>> from runtime.hub import download                          # doctest: +SKIP
    >>> path = download("user/llava-recipes", "recipe.safetensors")   # doctest: +SKIP
"""
from __future__ import annotations

from pathlib import Path

from .errors import HubAuthError, HubError, HubGatedRepoError, HubNotFoundError, HubOfflineError

DEFAULT_FILENAME = "recipe.safetensors"
_LOGIN = "log in with `hf auth login` or set HF_TOKEN"


def offline() -> bool:
    """Whether huggingface_hub is in offline mode (``HF_HUB_OFFLINE=1``): its own answer, not ours."""
    import huggingface_hub

    return bool(huggingface_hub.is_offline_mode())


def cache_dir() -> Path:
    """huggingface_hub's cache directory (``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else the default)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def repo_cache_folder(repo_id: str) -> Path:
    """Where the cache keeps ``repo_id`` (``models--org--name``), whether or not anything is there yet."""
    from huggingface_hub.file_download import repo_folder_name

    return cache_dir() / repo_folder_name(repo_id=repo_id, repo_type="model")


def download(repo_id: str, filename: str = DEFAULT_FILENAME, *, revision: str | None = None) -> Path:
    """One file of a model repository, through ``huggingface_hub.hf_hub_download`` and its cache.

    Offline mode and the local cache are honoured as huggingface_hub honours them: a cached file is
    returned without a request when ``HF_HUB_OFFLINE=1`` (or when the Hub cannot be reached).

    Args:
        repo_id: ``org/name``.
        filename: the file in the repository.
        revision: a branch, tag or commit; the default branch when ``None``.

    Returns:
        The path of the file in the local cache.

    Raises:
        HubOfflineError, HubNotFoundError, HubGatedRepoError, HubAuthError: as each says (one line).

    Example:
        >>> download("user/llava-recipes", revision="v1")   # doctest: +SKIP
        PosixPath('/root/.cache/huggingface/hub/models--user--llava-recipes/snapshots/…/recipe.safetensors')
    """
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision))
    except Exception as exc:  # noqa: BLE001 - translated into one of ours, or re-raised
        raise hub_error(exc, repo_id, filename=filename, revision=revision) from None


def hub_error(exc: BaseException, repo_id: str, *, filename: str | None = None, revision: str | None = None) -> BaseException:
    """The typed, one-line :class:`~runtime.errors.HubError` for a huggingface_hub exception.

    Anything that is not a Hub condition (a bug, a full disk) is returned unchanged, to be re-raised.

    Args:
        exc: what huggingface_hub raised.
        repo_id: the repository asked for.
        filename: the file asked for, if one.
        revision: the revision asked for, if one.
    """
    from huggingface_hub import errors as hf

    what = f"{filename} in {repo_id}" if filename else repo_id
    at = f" at revision {revision!r}" if revision else ""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, hf.GatedRepoError):  # before RepositoryNotFoundError, its base class
        return HubGatedRepoError(
            f"{repo_id} is a gated repository and this account has not been granted access; "
            f"request access at https://huggingface.co/{repo_id}, then {_LOGIN}"
        )
    if isinstance(exc, hf.RepositoryNotFoundError):
        who = "no Hub token is set" if _token() is None else "the Hub token in use cannot see it"
        return HubNotFoundError(
            f"repository {repo_id} not found on the Hub ({who}; a private repository looks the same): "
            f"check the id, or {_LOGIN} with an account that can read it"
        )
    if isinstance(exc, hf.HFValidationError):
        return HubNotFoundError(f"{repo_id!r} is not a Hub repository id ({str(exc).splitlines()[0]}); pass org/name or a local path")
    if isinstance(exc, hf.RevisionNotFoundError):
        return HubNotFoundError(f"revision {revision!r} not found in {repo_id}; pass an existing branch, tag or commit")
    if isinstance(exc, hf.EntryNotFoundError) and not isinstance(exc, hf.LocalEntryNotFoundError):
        return HubNotFoundError(f"{repo_id}{at} has no file {filename!r}; pass filename= with a file it holds")
    if isinstance(exc, hf.HfHubHTTPError) and status in (401, 403):
        return HubAuthError(
            f"the Hub refused the credentials for {repo_id} (HTTP {status}: an invalid token, or one without "
            f"read access); {_LOGIN} with a valid token"
        )
    if isinstance(exc, (hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled)):
        why = "HF_HUB_OFFLINE is set" if offline() else "the Hub cannot be reached"
        return HubOfflineError(
            f"{what}{at} is not in the local Hub cache ({repo_cache_folder(repo_id)}) and {why}; "
            f"fetch it once online (`hf download {repo_id}{' ' + filename if filename else ''}`) or pass a local path"
        )
    if isinstance(exc, hf.HfHubHTTPError):
        return HubError(f"the Hub answered HTTP {status} for {what}{at}; retry later or pass a local path")
    if isinstance(exc, (ConnectionError, TimeoutError)) or type(exc).__module__.startswith(("httpx", "requests", "urllib3")):
        return HubOfflineError(f"cannot reach the Hub for {what}{at} ({type(exc).__name__}) and it is not in the local "
                               f"Hub cache ({repo_cache_folder(repo_id)}); retry online or pass a local path")
    return exc


def _token() -> str | None:
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # noqa: BLE001 - an unreadable token file is no token
        return None


def push(recipe, repo_id: str, *, filename: str = DEFAULT_FILENAME, base_model: str | None = None,
         private: bool | None = None, token: str | None = None, revision: str | None = None,
         commit_message: str | None = None) -> str:
    """Upload ``recipe`` and its model card (``README.md``) to ``repo_id`` in one commit; see :meth:`Recipe.push_to_hub`."""
    from huggingface_hub import CommitOperationAdd, HfApi

    if offline():
        raise HubOfflineError(f"cannot push to {repo_id}: HF_HUB_OFFLINE is set; unset it to upload")
    card = model_card(recipe, repo_id, filename=filename, base_model=base_model)
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.create_commit(
            repo_id,
            [CommitOperationAdd(path_in_repo=filename, path_or_fileobj=recipe.to_bytes()),
             CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode("utf-8"))],
            commit_message=commit_message or f"Add pruning recipe {filename}",
            revision=revision,
        )
    except Exception as exc:  # noqa: BLE001 - translated into one of ours, or re-raised
        error = hub_error(exc, repo_id, revision=revision)
        if isinstance(error, HubOfflineError):
            error = HubOfflineError(f"cannot push to {repo_id}: the Hub cannot be reached ({type(exc).__name__}); retry online")
        raise error from None
    return str(getattr(info, "commit_url", info))


def model_card(recipe, repo_id: str, *, filename: str = DEFAULT_FILENAME, base_model: str | None = None) -> str:
    """The model card (``README.md``) :func:`push` writes beside a recipe: deterministic, from the recipe alone.

    It says which model the recipe fits (its fingerprint, and ``base_model`` when given), the budget,
    the verified FLOPs fraction and the fidelity figures the compiler measured, the schedule, and how
    to apply it.

    Args:
        recipe: the :class:`runtime.Recipe`.
        repo_id: the repository it goes to (for the loading example).
        filename: its file in the repository.
        base_model: the hub id of the model it was compiled for (model-card metadata), if known.

    Returns:
        Markdown with a YAML metadata block.
    """
    fp, prov = recipe.fingerprint, recipe.provenance
    model_type = fp.get("model_type", "?")
    meta = ["---", "library_name: recipe-compiler", "tags:", "- visual-token-pruning", "- recipe-compiler",
            f"- {model_type}"]
    if base_model:
        meta.append(f"base_model: {base_model}")
    meta.append("---")

    def figure(key: str, digits: int = 4) -> str:
        value = prov.get(key)
        return f"{value:.{digits}f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "not recorded"

    stage = recipe.pre_llm.get("method", "none")
    counts = [int(c) for c in recipe.keep_count]
    load_args = f'"{repo_id}"' + ("" if filename == DEFAULT_FILENAME else f', filename="{filename}"')
    lines = meta + [
        "",
        f"# Visual-token pruning recipe for {base_model or model_type}",
        "",
        f"A recipe-compiler recipe (`{filename}`): which visual tokens a {model_type} model drops at which decoder layer. "
        "The runtime applies it to the stock Hugging Face model with forward hooks; the weights are unchanged.",
        "",
        "## The model it fits",
        "",
        f"{'`' + base_model + '`, or any ' if base_model else 'Any '}`{model_type}` model with this fingerprint "
        "(checked at `apply()`; another model is refused with `RecipeMismatchError`):",
        "",
        "| model type | layers | hidden size | heads | KV heads | visual tokens per image | config hash |",
        "|---|---|---|---|---|---|---|",
        f"| {model_type} | {fp.get('num_layers', '?')} | {fp.get('hidden_size', '?')} | {fp.get('num_heads', '?')} | "
        f"{fp.get('num_kv_heads', '?')} | {fp.get('visual_tokens', '?')} | `{fp.get('config_hash', '?')}` |",
        "",
        "## Budget and measured figures",
        "",
        "Measured by the compiler on its calibration set, with the real runtime (the verification pass).",
        "",
        "| budget (LM prefill FLOPs) | verified FLOPs fraction | next-token KL | top-1 agreement | attention divergence (verified) | search |",
        "|---|---|---|---|---|---|",
        f"| {figure('budget', 3)} | {figure('flops_fraction')} | {figure('kl', 6)} | {figure('top1_agreement', 3)} | "
        f"{figure('divergence_verified')} | {prov.get('search', 'not recorded')} |",
        "",
        f"Scorer `{recipe.scorer}`, head reduction `{recipe.head_reduce}`, pre-LLM stage `{stage}`"
        + (f" (keep ratio {recipe.pre_llm['keep_ratio']})" if "keep_ratio" in recipe.pre_llm else "") + ".",
        f"Visual tokens entering each decoder layer (of {fp.get('visual_tokens', '?')}): {counts}.",
    ]
    calibration = prov.get("calibration")
    if isinstance(calibration, dict):
        lines.append(f"Calibration: {calibration.get('samples', '?')} samples, fingerprint `{calibration.get('fingerprint', '?')}`.")
    versions = prov.get("versions")
    if isinstance(versions, dict):
        lines.append("Compiled with " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())) + ".")
    if prov.get("source"):
        lines.append(f"Source: {prov['source']}.")
    lines += [
        "",
        "## How to apply",
        "",
        "```",
        "pip install recipe-compiler",
        "```",
        "",
        "```python",
        "from runtime import load",
        "",
        f"recipe = load({load_args})   # from the Hub, or the local cache (HF_HUB_OFFLINE=1 works once cached)",
        "with recipe.apply(model):     # model: the stock transformers model it fits",
        "    out = model.generate(**inputs, max_new_tokens=64)",
        "```",
        "",
        f"`recipe-inspect {repo_id}` prints the schedule and its provenance.",
        "",
    ]
    return "\n".join(lines)


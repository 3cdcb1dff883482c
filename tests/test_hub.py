"""The Hugging Face Hub, tested offline: a local cache layout, and a mocked Hub for its answers.

Nothing here reaches the network: every test runs with sockets refused, and the Hub's answers come
from an in-process transport (huggingface_hub's own client factory) or from a cache folder in tmp.
"""
from __future__ import annotations

import importlib
import socket

import pytest

from conftest import offline_hub
from runtime.errors import HubAuthError, HubError, HubGatedRepoError, HubNotFoundError, HubOfflineError, RecipeError


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """An online huggingface_hub whose every request is answered by ``hub.answer(request)`` (set by the test)."""
    import huggingface_hub.constants as constants
    from huggingface_hub.utils import _http

    http = importlib.import_module(type(_http.get_session()).__module__.split(".")[0])  # httpx (or its fork)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")  # a token is set: not-found says "cannot see it"

    class Hub:
        requests: list = []
        http_module = http

        def answer(self, request):  # replaced by each test
            raise AssertionError(f"unexpected request {request.method} {request.url}")

    state = Hub()
    factory = _http._GLOBAL_CLIENT_FACTORY
    _http.close_session()
    hooks = {"request": [_http.hf_request_event_hook]}  # huggingface_hub's own: it refuses requests when offline
    _http.set_client_factory(lambda: http.Client(
        transport=http.MockTransport(lambda r: (state.requests.append(r), state.answer(r))[1]),
        event_hooks=hooks, follow_redirects=True))
    yield state
    _http.close_session()
    _http.set_client_factory(factory)


def _refusal(http, status, code=None, message=None):
    def answer(request):
        headers = {"X-Error-Code": code} if code else {}
        if message:
            headers["X-Error-Message"] = message
        return http.Response(status, headers=headers, request=request)

    return answer


REFUSALS = {
    "gated": (403, "GatedRepo", None, HubGatedRepoError, "is a gated repository"),
    "not-found": (404, "RepoNotFound", None, HubNotFoundError, "not found on the Hub"),
    "private-401": (401, None, None, HubNotFoundError, "not found on the Hub"),
    "bad-token": (401, None, "Invalid credentials in Authorization header", HubAuthError, "refused the credentials"),
    "no-file": (404, "EntryNotFound", None, HubNotFoundError, "has no file 'recipe.safetensors'"),
    "no-revision": (404, "RevisionNotFound", None, HubNotFoundError, "revision 'v9' not found"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_each_hub_refusal_is_its_own_typed_one_line_error(hub, case):
    from runtime.hub import download

    status, code, message, error, says = REFUSALS[case]
    hub.answer = _refusal(hub.http_module, status, code, message)
    with pytest.raises(error) as info:
        download("some-org/some-repo", revision="v9" if case == "no-revision" else None)
    text = str(info.value)
    assert says in text and "\n" not in text and isinstance(info.value, RecipeError)
    assert hub.requests, "the mocked Hub was asked"


def test_a_gated_model_is_named_gated_by_the_model_loader_not_not_found(hub):
    from recipe_compiler.models import prepare_model

    hub.answer = _refusal(hub.http_module, 403, "GatedRepo")
    with pytest.raises(HubGatedRepoError, match="some-org/gated-model is a gated repository.*request access"):
        prepare_model("some-org/gated-model")


def test_an_unreachable_hub_still_means_not_cached_for_the_model_loader(hub):
    from recipe_compiler.errors import ModelNotFoundError
    from recipe_compiler.models import prepare_model

    def down(request):
        raise hub.http_module.ConnectError("connection refused", request=request)

    hub.answer = down
    with pytest.raises(ModelNotFoundError, match="weights not found in the HF cache .* the hub is unreachable"):
        prepare_model("some-org/some-model")


def test_offline_mode_and_cache_folder_are_huggingface_hubs_own(monkeypatch, tmp_path):
    import huggingface_hub

    from runtime import hub

    cache = offline_hub(monkeypatch, tmp_path / "cache")
    assert hub.offline() is huggingface_hub.is_offline_mode() is True
    assert hub.cache_dir() == cache
    assert hub.repo_cache_folder("org/name") == cache / "models--org--name"
    with pytest.raises(HubOfflineError, match="not in the local Hub cache .* HF_HUB_OFFLINE is set"):
        hub.download("org/name")
    assert issubclass(HubOfflineError, HubError)


# ----------------------------------------------------------------------------- load and push recipes

def _recipe():
    import numpy as np

    from runtime import Recipe

    fingerprint = {"model_type": "llava", "num_layers": 4, "hidden_size": 8, "num_heads": 2, "num_kv_heads": 2,
                   "visual_tokens": 16, "config_hash": "0123456789abcdef"}
    provenance = {"budget": 0.45, "flops_fraction": 0.4487, "kl": 0.00123, "top1_agreement": 0.9, "divergence": 1.5,
                  "divergence_verified": 1.52, "search": "optimal", "calibration": {"fingerprint": "c0ffee", "samples": 30},
                  "versions": {"recipe-compiler": "0.1.0", "torch": "2.13.0", "transformers": "5.23.0"}}
    return Recipe(keep_count=np.array([16, 8, 8, 4]), scorer="fitprune", fingerprint=fingerprint, provenance=provenance)


def _cache_layout(cache, repo_id, files, commit="0" * 39 + "1", ref="main"):
    """The layout hf_hub_download leaves: blobs by hash, snapshots/<commit>/<file> -> blob, refs/<ref>."""
    import hashlib

    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(blob)
    return repo


def test_load_a_hub_id_offline_from_the_local_cache(monkeypatch, tmp_path):
    from runtime import load

    cache = offline_hub(monkeypatch, tmp_path / "cache")
    recipe = _recipe()
    other = _recipe()
    other.keep_count[:] = 16
    _cache_layout(cache, "me/llava-recipes", {"recipe.safetensors": recipe.to_bytes(), "r100.safetensors": other.to_bytes()})
    assert load("me/llava-recipes").to_bytes() == recipe.to_bytes()
    assert load("me/llava-recipes", filename="r100.safetensors").keep_count.tolist() == [16, 16, 16, 16]
    assert load("me/llava-recipes", revision="0" * 39 + "1").to_bytes() == recipe.to_bytes()
    with pytest.raises(HubOfflineError, match="me/llava-recipes at revision 'v2' is not in the local Hub cache"):
        load("me/llava-recipes", revision="v2")
    with pytest.raises(HubOfflineError, match="missing.safetensors in me/llava-recipes is not in the local Hub cache"):
        load("me/llava-recipes", filename="missing.safetensors")


def test_a_local_path_wins_over_a_hub_id_and_takes_no_hub_options(monkeypatch, tmp_path):
    from runtime import RecipeError, load

    offline_hub(monkeypatch, tmp_path / "cache")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "me").mkdir()
    _recipe().save(tmp_path / "me" / "llava-recipes")  # a file whose relative path looks like a hub id
    assert load("me/llava-recipes").to_bytes() == _recipe().to_bytes()
    with pytest.raises(RecipeError, match="'me/llava-recipes' is a local path; pass the recipe file itself"):
        load("me/llava-recipes", revision="v1")
    with pytest.raises(RecipeError, match="recipe file missing.safetensors not found"):
        load("missing.safetensors")  # a missing file is still a missing file, not a hub id


class _FakeHub:
    """The upload API (HfApi.create_repo / create_commit) recording into a dict, and the Hub serving it back."""

    def __init__(self):
        self.repos, self.commits = {}, []

    def create_repo(self, api, repo_id, *, repo_type=None, private=None, exist_ok=False, **_):
        assert exist_ok and repo_type == "model"
        self.repos.setdefault(repo_id, {"private": private, "files": {}})

    def create_commit(self, api, repo_id, operations, *, commit_message, revision=None, **_):
        files = self.repos[repo_id]["files"]  # create_commit on a missing repo would fail on the Hub too
        for op in operations:
            files[op.path_in_repo] = op.path_or_fileobj if isinstance(op.path_or_fileobj, bytes) else op.path_or_fileobj.read()
        commit = f"{len(self.commits) + 1:040x}"
        self.commits.append((repo_id, commit, commit_message, [op.path_in_repo for op in operations], revision))
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/{commit}"})()

    def answer(self, http, request):
        """resolve/<revision>/<file>: HEAD gives the metadata hf_hub_download checks, GET the bytes."""
        import hashlib

        parts = request.url.path.strip("/").split("/")
        repo_id, filename = "/".join(parts[:2]), "/".join(parts[4:])
        files = self.repos.get(repo_id, {}).get("files", {})
        if parts[2:3] != ["resolve"] or filename not in files:
            return http.Response(404, headers={"X-Error-Code": "EntryNotFound"}, request=request)
        data = files[filename]
        headers = {"X-Repo-Commit": self.commits[-1][1], "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                   "Content-Length": str(len(data))}
        return http.Response(200, headers=headers, content=b"" if request.method == "HEAD" else data, request=request)


def test_push_writes_the_recipe_and_a_model_card_in_one_commit(hub, monkeypatch):
    from huggingface_hub import HfApi

    fake = _FakeHub()
    monkeypatch.setattr(HfApi, "create_repo", lambda api, *a, **k: fake.create_repo(api, *a, **k))
    monkeypatch.setattr(HfApi, "create_commit", lambda api, *a, **k: fake.create_commit(api, *a, **k))
    recipe = _recipe()
    url = recipe.push_to_hub("me/llava-prune-045", base_model="llava-hf/llava-1.5-7b-hf", private=True)
    assert url == "https://huggingface.co/me/llava-prune-045/commit/" + f"{1:040x}"
    (repo_id, _, message, paths, revision), = fake.commits
    assert paths == ["recipe.safetensors", "README.md"] and message == "Add pruning recipe recipe.safetensors"
    files = fake.repos["me/llava-prune-045"]["files"]
    assert files["recipe.safetensors"] == recipe.to_bytes() and fake.repos[repo_id]["private"] is True
    card = files["README.md"].decode()
    assert card.startswith("---\nlibrary_name: recipe-compiler\n") and "base_model: llava-hf/llava-1.5-7b-hf" in card
    for shown in ("| llava | 4 | 8 | 2 | 2 | 16 | `0123456789abcdef` |",  # the model it fits
                  "| 0.450 | 0.4487 | 0.001230 | 0.900 | 1.5200 | optimal |",  # budget, verified FLOPs, fidelity
                  "[16, 8, 8, 4]", 'recipe = load("me/llava-prune-045")', "with recipe.apply(model):"):
        assert shown in card, shown
    assert recipe.push_to_hub("me/llava-prune-045", base_model="llava-hf/llava-1.5-7b-hf") and \
        fake.repos[repo_id]["files"]["README.md"].decode() == card  # the card depends on the recipe alone
    assert not hub.requests  # the upload API was the mock; nothing else was asked


def test_a_pushed_recipe_loads_back_byte_identical_through_the_local_cache(hub, monkeypatch, tmp_path):
    import huggingface_hub.constants as constants
    from huggingface_hub import HfApi

    from runtime import load

    fake = _FakeHub()
    monkeypatch.setattr(HfApi, "create_repo", lambda api, *a, **k: fake.create_repo(api, *a, **k))
    monkeypatch.setattr(HfApi, "create_commit", lambda api, *a, **k: fake.create_commit(api, *a, **k))
    hub.answer = lambda request: fake.answer(hub.http_module, request)
    recipe = _recipe()
    recipe.push_to_hub("me/llava-prune-045", filename="r45.safetensors")
    downloaded = load("me/llava-prune-045", filename="r45.safetensors")  # through hf_hub_download, into the cache
    assert downloaded.to_bytes() == recipe.to_bytes()
    cached = list((tmp_path / "hf-cache" / "models--me--llava-prune-045" / "snapshots").glob("*/r45.safetensors"))
    assert len(cached) == 1 and cached[0].read_bytes() == recipe.to_bytes()  # the file itself, byte for byte
    asked = len(hub.requests)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # now offline: the cache alone serves it
    assert load("me/llava-prune-045", filename="r45.safetensors").to_bytes() == recipe.to_bytes()
    assert len(hub.requests) == asked
    with pytest.raises(HubOfflineError, match="cannot push to me/llava-prune-045: HF_HUB_OFFLINE is set"):
        recipe.push_to_hub("me/llava-prune-045")


def test_push_refusals_are_typed(hub, monkeypatch):
    hub.answer = _refusal(hub.http_module, 401, None, "Invalid credentials in Authorization header")
    with pytest.raises(HubAuthError, match="refused the credentials for me/x"):
        _recipe().push_to_hub("me/x")


def test_recipe_inspect_reads_a_hub_id_from_the_cache_offline(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    cache = tmp_path / "cache"
    _cache_layout(cache, "me/llava-recipes", {"recipe.safetensors": _recipe().to_bytes()})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    root = Path(__file__).resolve().parents[1]
    code = "import sys; from recipe_compiler.cli import inspect_main; sys.exit(inspect_main(sys.argv[1:]))"
    out = subprocess.run([sys.executable, "-c", code, "me/llava-recipes"], capture_output=True, text=True, env=env,
                         cwd=root, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "llava" in out.stdout and "0.45" in out.stdout
    out = subprocess.run([sys.executable, "-c", code, "me/other-recipes"], capture_output=True, text=True, env=env,
                         cwd=root, timeout=300)
    assert out.returncode != 0 and len(out.stderr.strip().splitlines()) == 1
    assert "me/other-recipes is not in the local Hub cache" in out.stderr and "HF_HUB_OFFLINE is set" in out.stderr

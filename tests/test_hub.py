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
    _http.set_client_factory(lambda: http.Client(transport=http.MockTransport(lambda r: (state.requests.append(r), state.answer(r))[1])))
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

"""The vLLM plugin end to end: greedy parity with the HF runtime, prompt sizes, the server, refusals."""
from __future__ import annotations

import base64
import gc
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import MAX_TOKENS, ROOT, requests_for
from tiny import FAMILIES, STAGES, prompt_text

import runtime.vllm
from runtime import RecipeError, RecipeMismatchError, load
from runtime.prellm import stage_count

CASES = [(family, stage) for family in FAMILIES for stage in STAGES]
LOGPROB_TOLERANCE = 1e-2  # vLLM's kernels vs HF's in fp32: measured ≤ 3e-3; the tokens must be identical


@contextmanager
def engine(model_dir: str, recipe: str | None, **options):
    from vllm import LLM

    hf_overrides = runtime.vllm.overrides(recipe, **options) if recipe else None
    llm = LLM(model=model_dir, dtype="float32", max_model_len=1024, enforce_eager=True, seed=0,
              limit_mm_per_prompt={"image": 1}, hf_overrides=hf_overrides)
    try:
        yield llm
    finally:
        del llm
        gc.collect()


def generate(llm, requests: list[dict]) -> list:
    from PIL import Image
    from vllm import SamplingParams

    prompts = [{"prompt": prompt_text(r["prompt"]), "multi_modal_data": {"image": Image.open(r["image"]).convert("RGB")}}
               for r in requests]
    return llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=0), use_tqdm=False)


def kept_tokens(family: str, recipe_path: str, image_path: str) -> int:
    """What the recipe implies for one image, from the HF-side layout (not the plugin's own arithmetic)."""
    from PIL import Image

    recipe = load(recipe_path)
    ratio = recipe.pre_llm["keep_ratio"]
    vision = FAMILIES[family]["vision_config"]
    side = vision["image_size"] // vision["patch_size"]
    if family == "llava":
        return stage_count(ratio, side * side)
    import torch
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    width, height = Image.open(image_path).size
    pinpoints = [list(p) for p in FAMILIES[family]["image_grid_pinpoints"]]
    grid_h, grid_w = get_anyres_image_grid_shape([height, width], pinpoints, vision["image_size"])
    rows, cols = unpad_image(torch.empty(0, grid_h * side, grid_w * side), [height, width]).shape[1:]
    return stage_count(ratio, side * side) + stage_count(ratio, int(rows) * int(cols)) + int(rows)


def text_tokens(model_dir: str, prompt: str) -> int:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return len(tokenizer(prompt_text(prompt)).input_ids) - 1  # the <image> placeholder itself is replaced


@pytest.mark.parametrize("family,stage", CASES, ids=[f"{f}-{s}" for f, s in CASES])
def test_greedy_tokens_equal_the_hf_runtime_for_a_batch_of_three_images(tiny, references, family, stage):
    requests = requests_for(family, tiny)
    recipe = tiny[family]["recipes"][stage]
    with engine(tiny[family]["dir"], recipe) as llm:
        outputs = generate(llm, requests)
    for request, output, reference in zip(requests, outputs, references[(family, stage)]):
        expected = text_tokens(tiny[family]["dir"], request["prompt"]) + kept_tokens(family, recipe, request["image"])
        assert len(output.prompt_token_ids) == expected == reference["prompt_tokens"], request
        got = output.outputs[0]
        assert list(got.token_ids) == reference["tokens"], request
        logprobs = [lp[t].logprob for lp, t in zip(got.logprobs, got.token_ids)]
        worst = max(abs(a - b) for a, b in zip(logprobs, reference["logprobs"]))
        assert worst <= LOGPROB_TOLERANCE, (request, worst)


def test_a_recipe_with_an_in_llm_schedule_serves_its_stage_and_says_so_once(tiny, monkeypatch):
    import runtime.vllm_models as models

    said = []
    monkeypatch.setattr(models, "_said", set())
    monkeypatch.setattr(models.logger, "info", lambda fmt, *args: said.append(fmt % args))
    family, requests = "llava", requests_for("llava", tiny)
    recipe = str(Path(tiny[family]["recipe_dir"]) / "stage-and-schedule.safetensors")
    with engine(tiny[family]["dir"], recipe) as llm:
        outputs = generate(llm, requests)
        generate(llm, requests)  # more requests say nothing more
    about = [line for line in said if "only its pre-LLM stage" in line]
    assert len(about) == 1, said
    assert "prunes inside the language model at layers [2]" in about[0]
    for request, output in zip(requests, outputs):
        assert len(output.prompt_token_ids) == text_tokens(tiny[family]["dir"], request["prompt"]) + kept_tokens(family, recipe, request["image"])
    with pytest.raises(RecipeError, match="prunes inside the language model"):
        runtime.vllm.overrides(recipe, in_llm_schedule="refuse")


def test_a_recipe_for_another_model_refuses_to_start_with_one_line(tiny):
    recipe = str(Path(tiny["llava"]["recipe_dir"]) / "foreign.safetensors")
    with pytest.raises(RecipeMismatchError) as caught:
        with engine(tiny["llava"]["dir"], recipe):
            pass
    message = str(caught.value)
    assert message.startswith("recipe does not fit this model: hidden_size is 256 in the recipe but 128 in the model; "
                              "compile a recipe for this model"), message
    assert "\n" not in message


def test_a_llava_next_recipe_refuses_a_llava_model(tiny):
    with pytest.raises(RecipeMismatchError, match="model_type is 'llava_next' in the recipe but 'llava' in the model"):
        with engine(tiny["llava"]["dir"], tiny["llava_next"]["recipes"]["g-prune"]):
            pass


# ------------------------------------------------------------------------------------ server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float = 120.0) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


@contextmanager
def server(model_dir: str, hf_overrides: str, log_path: Path):
    port = _free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--host", "127.0.0.1",
               "--port", str(port), "--dtype", "float32", "--max-model-len", "1024", "--enforce-eager",
               "--limit-mm-per-prompt", json.dumps({"image": 1}), "--hf-overrides", hf_overrides]
    log = open(log_path, "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True, env=os.environ.copy())
    try:
        yield process, f"http://127.0.0.1:{port}"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        log.close()


def _wait_ready(process, url: str, log_path: Path, limit: float = 420.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(2)
    pytest.fail(f"the server did not become ready in {limit:.0f} s:\n{log_path.read_text()[-3000:]}")


def test_openai_server_chat_completion_with_an_image_reports_the_pruned_prompt_tokens(tiny, references, tmp_path):
    family, stage = "llava", "g-prune"
    request = requests_for(family, tiny)[0]
    reference = references[(family, stage)][0]
    with open(request["image"], "rb") as handle:
        image_url = "data:image/png;base64," + base64.b64encode(handle.read()).decode()
    log_path = tmp_path / "server.log"
    with server(tiny[family]["dir"], runtime.vllm.overrides_json(tiny[family]["recipes"][stage]), log_path) as (process, url):
        _wait_ready(process, url, log_path)
        reply = _post(url + "/v1/chat/completions", {
            "model": tiny[family]["dir"], "max_tokens": MAX_TOKENS, "temperature": 0.0,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                                      {"type": "text", "text": request["prompt"]}]}],
        })
    unpruned = text_tokens(tiny[family]["dir"], request["prompt"]) + (FAMILIES[family]["vision_config"]["image_size"] // 4) ** 2
    assert reply["usage"]["prompt_tokens"] == reference["prompt_tokens"] < unpruned, reply["usage"]
    assert reply["usage"]["completion_tokens"] == MAX_TOKENS
    assert "serving pre-LLM stage g-prune at keep ratio 0.25" in log_path.read_text()

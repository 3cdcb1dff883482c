"""Concurrent requests on one patched model (a server's request threads) are each exactly what they are alone.

Threads share one model and one handle; each sends a different request (prompt, image, length,
batch size). Every thread's sequences and per-step logits must equal the same request run alone,
bit for bit, in every round.
"""
from __future__ import annotations

import contextlib
import re
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from families import FamilyCase, family_params
from recipe_compiler.search import SEARCHES
from runtime import Recipe, RecipeMismatchError
from runtime.families import family_for, model_fingerprint
from runtime.methods.scorers import SCORERS
from runtime.methods.stages import STAGES
from runtime.prellm_stage import unsupported_reason

PEER_STAGES = [name for name in ("visionzip", "divprune", "vtc-cls", "prumerge-plus") if name in STAGES]

THREADS = 4
ROUNDS = 6
GREEDY = dict(max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)
QUESTIONS = ["What is in the picture?", "Describe the colours of this picture in detail, please.", "Count?",
             "Is there a cat in this image, or is it something else?"]


def _requests(case: FamilyCase, loaded) -> list[dict]:
    from recipe_compiler.calibration import load_calibration, load_image

    samples = load_calibration().samples
    out = []
    for i, question in enumerate(QUESTIONS):
        size = case.image_sizes[i % 2]
        images = [load_image(samples[i + j]).resize(size, Image.BICUBIC) for j in range(1 + i % 2)]
        texts = [loaded.format_prompt(question)] if i % 2 == 0 else [loaded.format_prompt(question), loaded.format_prompt("Why?")]
        out.append(dict(loaded.processor(images=images, text=texts, return_tensors="pt", padding=True)))
    return out


def _recipe(model, stage: bool | str | None):
    if stage is None:  # the control: the unpatched model under the same threads
        return contextlib.nullcontext()
    fp = model_fingerprint(model)
    v, layers = fp["visual_tokens"], fp["num_layers"]
    if isinstance(stage, str) and stage.startswith("method-"):  # an in-LLM peer at its paper defaults (per-request scorer state)
        search = SEARCHES[stage[len("method-"):]]
        return Recipe(keep_count=search.example(layers, v), scorer=search.scorer, fingerprint=fp).apply(model)
    counts = np.array([v, v] + [v // 2] * 2 + [v // 4] * (layers - 4))
    method = "g-prune" if stage is True else stage
    if not stage:
        spec = {"method": "none"}
    elif STAGES[method].fixed_ratio:
        spec = {"method": method, "keep_ratio": 0.75, "params": {}}
    else:
        spec = {"method": method, "params": {}}
    return Recipe(keep_count=counts, scorer="fitprune", fingerprint=fp, pre_llm=spec).apply(model)


def _same(a, b) -> bool:
    return torch.equal(a.sequences, b.sequences) and all(torch.equal(x, y) for x, y in zip(a.logits, b.logits))


_METHODS = [f"method-{name}" for name, search in SEARCHES.items() if search.is_method]


@pytest.mark.parametrize("stage", [None, False, True, *PEER_STAGES, *_METHODS],
                         ids=["unpatched", "schedule", "stage+schedule", *(f"{name}+schedule" for name in PEER_STAGES), *_METHODS])
@pytest.mark.parametrize("case", family_params())
def test_threads_sharing_one_patched_model_each_get_what_they_get_alone(case: FamilyCase, stage: bool | str | None):
    loaded = case.load()
    model = loaded.model
    if isinstance(stage, str) and stage in STAGES and unsupported_reason(model, stage):
        with pytest.raises(RecipeMismatchError, match=re.escape(stage)):  # refused at apply, before any request
            _recipe(model, stage)
        return
    if isinstance(stage, str) and stage.startswith("method-"):
        search = SEARCHES[stage[len("method-"):]]
        if SCORERS[search.scorer].unsupported_reason(model):  # e.g. PDrop's query recomputation on Qwen3.5's linear layers
            with pytest.raises(RecipeMismatchError, match=f"scorer {search.scorer!r} cannot run on this model"):
                _recipe(model, stage)
            return
        fp = model_fingerprint(model)
        counts = search.example(fp["num_layers"], fp["visual_tokens"])
        cuts = {layer for layer in range(1, len(counts)) if counts[layer] < counts[layer - 1]}
        if not cuts <= set(family_for(model).cut_layers(model)):  # a paper schedule cutting after a linear-attention layer
            with pytest.raises(RecipeMismatchError, match="scoring cut may only enter"):
                _recipe(model, stage)
            return
    requests = _requests(case, loaded)
    with _recipe(model, stage), torch.no_grad():
        alone = [model.generate(**r, **GREEDY) for r in requests]
        failures: list[str] = []

        def serve(index: int, start: threading.Barrier) -> None:
            start.wait()
            try:
                out = model.generate(**requests[index], **GREEDY)
                if not _same(out, alone[index]):
                    failures.append(f"request {index}: output differs from the request run alone")
            except Exception as exc:  # noqa: BLE001 - reported as the test's failure
                failures.append(f"request {index}: {type(exc).__name__}: {exc}")

        for _ in range(ROUNDS):
            start = threading.Barrier(THREADS)
            threads = [threading.Thread(target=serve, args=(i % len(requests), start)) for i in range(THREADS)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    assert not failures, "; ".join(failures[:4])

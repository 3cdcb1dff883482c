"""The accuracy testbed: the generator is deterministic and balanced, packed training sees what a
one-question prompt sees, the built-in model loads with its tokenizer, recipe-eval reports accuracy,
random keep is seeded, and the trained model keeps its answers unpruned and under the 0.45 recipe."""
from __future__ import annotations

import hashlib
import json
from collections import Counter

import numpy as np
import pytest
import torch

from recipe_compiler.testbed.make import write_dataset
from recipe_compiler.testbed.scenes import ANSWERS, COLOUR_NAMES as COLOURS_ORDER, QTYPES, SHAPES as SHAPES_ORDER, make_scene

# Floors for the shipped weights (step 11174 of the retrieval-curriculum run), set from the values measured on them
# with a margin: on these 240 questions (seed 7) unpruned 87.1 % (209); the default 0.45 recipe (--pre-llm auto, chosen
# on the 2 calibration scenes of seed 8: VTC-CLS 0.75, then [256, 140, ...] from layer 1; 0.441 of the FLOPs) 84.2 %
# (202); optimal alone in the LLM at 0.45 81.7 % (196; the budget counting the scorer's probes: [256, 94, 94, 94, 94,
# 94, 94, 88], 0.436 of the FLOPs on these prompts) (2-core CPU, torch 2.13.0). The model answers 36.3 % with the
# image removed, so a method or runtime regression that loses the image falls far below the floors. The results are
# deterministic; the margin covers kernels of other machines.
UNPRUNED_FLOOR = 0.82
DEFAULT_045_FLOOR = 0.80
RECIPE_045_FLOOR = 0.75  # optimal alone in the language model: the in-LLM runtime's pruning, probes included
FLOOR_QUESTIONS = 240
FLOOR_SEED = 7


def _digest(folder) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            h.update(path.relative_to(folder).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def test_the_generator_is_deterministic_per_seed(tmp_path):
    write_dataset(11, 3, tmp_path / "a")
    write_dataset(11, 3, tmp_path / "b")
    write_dataset(12, 3, tmp_path / "c")
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
    lines = [json.loads(line) for line in (tmp_path / "a" / "manifest.jsonl").read_text().splitlines()]
    assert {"id", "image", "prompt", "kind", "split", "answer", "qtype"} <= set(lines[0])
    assert all(line["answer"] in ANSWERS[line["qtype"]] for line in lines)


def test_the_manifest_loads_as_calibration_data_with_answers(tmp_path):
    from recipe_compiler.calibration import load_calibration

    write_dataset(13, 2, tmp_path, split="calib")
    samples = load_calibration(str(tmp_path)).samples
    assert samples and all(s.answer and s.qtype in QTYPES for s in samples)


def test_answers_are_balanced_and_patch_labels_match_the_objects():
    by_type: dict = {}
    for i in range(80):
        scene = make_scene(21, i)
        for q in scene.questions:
            by_type.setdefault(q.qtype, Counter())[q.answer] += 1
        assert (scene.patch_labels[2] > 0).any()  # the digit tile covers patches
        for obj in scene.objects:  # every object, however small or wherever it falls, labels a patch
            colour, shape = COLOURS_ORDER.index(obj.colour) + 1, SHAPES_ORDER.index(obj.shape) + 1
            assert ((scene.patch_labels[0] == colour) & (scene.patch_labels[1] == shape)).any(), obj
    assert set(by_type) == set(QTYPES)
    for qtype, counts in by_type.items():
        share = max(counts.values()) / sum(counts.values())
        assert share <= 2.2 / len(ANSWERS[qtype]), (qtype, counts)  # no answer much above its fair share


def test_packed_questions_see_exactly_the_one_question_prompt():
    from recipe_compiler.testbed.model import build_model, pack, packed_logits, pixel_tensor
    from recipe_compiler.testbed.vocab import IMAGE_ID, testbed_tokenizer

    tokenizer = testbed_tokenizer()
    model = build_model(0).eval()
    scenes = [make_scene(5, i) for i in range(2)]
    packed = pack(tokenizer, [[(q.prompt, q.answer) for q in s.questions] for s in scenes])
    pixels = pixel_tensor([s.image for s in scenes])
    with torch.no_grad():
        logits, _ = packed_logits(model, packed, pixels)
        flat = [(b, q) for b, s in enumerate(scenes) for q in s.questions]
        for (b, pos, answer_id), (row, q) in zip(packed["answer_pos"], flat):
            ids = tokenizer(f"USER: <image>\n{q.prompt} ASSISTANT:").input_ids
            at = ids.index(IMAGE_ID)
            ids = ids[:at] + [IMAGE_ID] * 256 + ids[at + 1:]
            single = model(input_ids=torch.tensor([ids]), pixel_values=pixels[row:row + 1]).logits[0, -1]
            assert (single - logits[b, pos]).abs().max().item() < 1e-5
            assert answer_id == tokenizer(q.answer, add_special_tokens=False).input_ids[0]


@pytest.fixture(scope="module")
def testbed():
    from recipe_compiler.models import load_model

    return load_model("testbed-llava")


def test_testbed_llava_loads_trained_weights_and_its_word_tokenizer(testbed):
    assert "trained weights" in testbed.source
    assert testbed.model.config.image_seq_length == 256
    assert testbed.model.config.text_config.num_hidden_layers == 8
    inputs = testbed.processor(images=[make_scene(3, 0).image], text=[testbed.format_prompt("which digit is shown ?")],
                               return_tensors="pt")
    assert int((inputs["input_ids"] == testbed.model.config.image_token_index).sum()) == 256
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 224, 224)


def test_recipe_eval_reports_accuracy_per_type_with_intervals(testbed, tmp_path):
    from recipe_compiler.calibration import load_calibration
    from recipe_compiler.evaluate import evaluate_recipes, format_table
    from runtime import Recipe
    from runtime.families import model_fingerprint

    write_dataset(17, 1, tmp_path)
    data = load_calibration(str(tmp_path), split=None)
    keep_all = Recipe.keep_all(model_fingerprint(testbed.model))
    (result,) = evaluate_recipes(testbed.model, testbed.processor, data, {"keep-all": keep_all},
                                 format_prompt=testbed.format_prompt, new_tokens=2, repeats=1)
    acc = result.accuracy
    assert acc == result.unpruned_accuracy  # keep-all answers exactly as the unpruned model
    assert acc["n"] == len(data) and sum(t["n"] for t in acc["per_type"].values()) == len(data)
    low, high = acc["ci95"]
    assert 0.0 <= low <= acc["accuracy"] <= high <= 1.0
    assert "exact match" in format_table([result])


def test_random_keep_is_seeded_and_keeps_the_recipe_count():
    from runtime.methods.stages import STAGES
    from runtime.methods.stages.random_keep import random_scores

    stage = STAGES["random"]
    a, b = random_scores(256, 0), random_scores(256, 0)
    assert torch.equal(a, b) and not torch.equal(a, random_scores(256, 1))
    keep = stage.keep(a, 0.3, (16, 16), {})
    assert int(keep.sum()) == 77  # round_half_up(0.3 * 256)
    assert stage.baseline


def test_trained_testbed_keeps_its_answers_unpruned_and_at_budget_045(testbed, tmp_path):
    """Fast (a few hundred seeded questions): accuracy unpruned, with the default 0.45 recipe and with the
    in-LLM-only one (the default may choose a stage; the in-LLM runtime must keep its answers too)."""
    if UNPRUNED_FLOOR is None:
        pytest.skip("floors not set for these weights")
    from recipe_compiler.calibration import load_calibration
    from recipe_compiler.compile import CompileConfig, compile_recipe
    from recipe_compiler.testbed.table import measure, prepare_batches, unpruned_reference

    write_dataset(FLOOR_SEED, FLOOR_QUESTIONS // 8, tmp_path / "heldout", questions=FLOOR_QUESTIONS)
    write_dataset(FLOOR_SEED + 1, 2, tmp_path / "calib", split="calib")
    heldout = load_calibration(str(tmp_path / "heldout"), split=None)
    calib = load_calibration(str(tmp_path / "calib"))
    default = compile_recipe(testbed.model, testbed.processor, calib, CompileConfig(budget=0.45), format_prompt=testbed.format_prompt)
    recipe = compile_recipe(testbed.model, testbed.processor, calib, CompileConfig(budget=0.45, pre_llm="none"),
                            format_prompt=testbed.format_prompt, statistics=default.statistics).recipe
    batches = prepare_batches(testbed, heldout.samples)
    refs = unpruned_reference(testbed.model, batches)
    from runtime import Recipe
    from runtime.families import model_fingerprint

    unpruned = measure(testbed.model, batches, refs, Recipe.keep_all(model_fingerprint(testbed.model)))
    pruned = measure(testbed.model, batches, refs, recipe)
    assert unpruned["n"] == FLOOR_QUESTIONS
    assert unpruned["accuracy"] >= UNPRUNED_FLOOR, unpruned
    assert pruned["flops_fraction"] <= 0.47
    assert pruned["accuracy"] >= RECIPE_045_FLOOR, pruned
    chosen = measure(testbed.model, batches, refs, default.recipe)
    assert chosen["flops_fraction"] <= 0.47
    assert chosen["accuracy"] >= DEFAULT_045_FLOOR, (default.recipe.pre_llm, chosen)

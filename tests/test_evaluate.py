"""recipe-eval (fidelity, FLOPs, timing, KV bytes), FitPrune presets, and the pictures."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli
from recipe_compiler.evaluate import evaluate_recipes, main as eval_main
from runtime.families import model_fingerprint
from runtime.errors import RecipeError, RecipeMismatchError
from runtime.presets import LLAVA_15_7B_FINGERPRINT, fitprune_published, keep_counts_from_pruned, resolve
from runtime.recipe import Recipe

needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                      reason="matplotlib is not installed (the optional plots extra: pip install -e '.[plots]')")
# FitPrune's published schedules as shipped with the conformance vectors; the runtime packages the same file.
PUBLISHED = Path(__file__).resolve().parent / "data" / "conformance" / "fitprune" / "published_recipes.json"


@pytest.fixture(scope="module")
def heldout():
    from recipe_compiler.calibration import load_calibration

    return load_calibration(split="heldout", samples=4)


@pytest.fixture(scope="module")
def recipe25(tiny):
    from recipe_compiler.calibration import load_calibration
    from recipe_compiler.compile import CompileConfig, compile_recipe

    calibration = load_calibration(samples=4)
    result = compile_recipe(tiny.model, tiny.processor, calibration, CompileConfig(budget=0.25), format_prompt=tiny.format_prompt)
    return calibration, result.recipe


def _run(capsys, argv):
    return run_cli(capsys, argv, eval_main)


# ------------------------------------------------------------------------------- recipe-eval
def test_keep_all_recipe_reports_kl_zero_and_agreement_one_exactly(tiny, heldout):
    recipe = Recipe.keep_all(model_fingerprint(tiny.model))
    [r] = evaluate_recipes(tiny.model, tiny.processor, heldout, {"keep-all": recipe}, format_prompt=tiny.format_prompt,
                           new_tokens=4, repeats=1)
    assert r.kl == 0.0
    assert r.top1_agreement == 1.0
    assert r.greedy_match == 1.0 and r.greedy_exact == 1.0
    assert r.flops_fraction == 1.0
    assert r.kv_bytes == r.unpruned_kv_bytes > 0 and r.kv_fraction == 1.0
    assert r.prefill_ms > 0 and r.unpruned_prefill_ms > 0 and r.samples == 4


def test_budget_quarter_recipe_reports_flops_within_budget_and_a_measured_prefill_ratio(tiny, recipe25):
    calibration, recipe = recipe25
    [r] = evaluate_recipes(tiny.model, tiny.processor, calibration, {"b25": recipe}, format_prompt=tiny.format_prompt,
                           new_tokens=4, repeats=2)
    # on the prompts the budget was set on, the measured fraction is within it
    assert r.flops_fraction <= 0.25 * (1 + 1e-9)
    assert np.isfinite(r.prefill_ratio) and r.prefill_ratio > 0
    assert r.prefill_ratio == pytest.approx(r.prefill_ms / r.unpruned_prefill_ms)
    assert r.kv_bytes < r.unpruned_kv_bytes  # the cache really shrinks
    assert 0 <= r.greedy_match <= 1 and 0 <= r.top1_agreement <= 1 and r.kl >= 0
    assert r.mean_visual_tokens < 576


def test_cli_compares_several_recipes_in_one_table_and_as_json(tiny, recipe25, tmp_path, capsys):
    _, recipe = recipe25
    keep_all = Recipe.keep_all(model_fingerprint(tiny.model))
    keep_all.save(tmp_path / "keep.safetensors")
    recipe.save(tmp_path / "b25.safetensors")
    argv = ["--model", "tiny-llava", "--recipe", str(tmp_path / "keep.safetensors"), "--recipe", str(tmp_path / "b25.safetensors"),
            "--samples", "2", "--new-tokens", "2", "--repeats", "1"]
    code, out, err = _run(capsys, argv + ["--json"])
    assert code == 0, err
    results = {r["name"]: r for r in json.loads(out)["results"]}
    assert set(results) == {"keep", "b25"}
    assert results["keep"]["kl"] == 0.0 and results["keep"]["top1_agreement"] == 1.0 and results["keep"]["greedy_match"] == 1.0
    assert results["b25"]["kv_fraction"] < 1.0 and results["b25"]["prefill_ratio"] > 0
    from recipe_compiler.evaluate import Evaluation, format_table

    lines = format_table([Evaluation(**r) for r in json.loads(out)["results"]]).splitlines()
    assert lines[0].split()[:4] == ["recipe", "flops", "vis.tok", "KL"]
    assert lines[2].startswith("keep ") and lines[3].startswith("b25 ")


@pytest.mark.parametrize("extra, fragment", [
    (["--recipe", "/nonexistent/r.safetensors"], "r.safetensors"),
    (["--recipe", "fitprune:33"], "no '33'% recipe"),
    (["--recipe", "fitprune:40@/nonexistent.json"], "cannot read FitPrune presets"),
    (["--recipe", "KEEP", "--show", "x.png"], "--show IMAGE and --out DIR go together"),
    (["--recipe", "KEEP", "--data", "/nonexistent-dir"], "nonexistent-dir"),
    (["--recipe", "KEEP", "--layers", "a,b"], "layers must be"),
    (["--recipe", "KEEP", "--device", "meta"], "cannot run calibration or evaluation"),
    (["--recipe", "KEEP", "--data", "INVISIBLE"], '"prompt" is only invisible characters (U+0000 U+200B)'),
    pytest.param(["--recipe", "KEEP", "--show", "RED", "--out", "FIFO"], "exists and is not a directory", marks=needs_matplotlib),
    pytest.param(["--recipe", "KEEP", "--show", "RED", "--out", "PICS_WITH_FIFO"],
                 "tokens-keep.png is a FIFO (named pipe), not a regular file", marks=needs_matplotlib),
])
def test_bad_input_is_one_line_and_nonzero_before_loading_the_model(extra, fragment, tiny, tmp_path, capsys, monkeypatch):
    import os

    import recipe_compiler.models as models

    def refuse(*args, **kwargs):
        raise AssertionError("the model's weights were built before the bad input was refused")

    monkeypatch.setattr(models, "_random_model", refuse)
    keep = tmp_path / "keep.safetensors"
    Recipe.keep_all(model_fingerprint(tiny.model)).save(keep)
    manifest = tmp_path / "invisible.jsonl"
    _red(tmp_path)
    manifest.write_text(json.dumps({"image": "red.png", "prompt": "\u0000\u200b"}) + "\n")
    pics = tmp_path / "pics"
    pics.mkdir()
    os.mkfifo(pics / "tokens-keep.png")  # matplotlib would block on it
    os.mkfifo(tmp_path / "fifo")
    paths = {"KEEP": keep, "INVISIBLE": manifest, "RED": tmp_path / "red.png", "FIFO": tmp_path / "fifo", "PICS_WITH_FIFO": pics}
    argv = [str(paths[a]) if a in paths else a for a in extra]
    code, out, err = _run(capsys, ["--model", "tiny-llava"] + argv)
    assert code != 0 and out == ""
    assert len(err.strip().splitlines()) == 1 and fragment in err


def test_a_llava_preset_refuses_the_tiny_model_by_name(tiny, heldout):
    with pytest.raises(RecipeMismatchError, match="num_layers"):
        evaluate_recipes(tiny.model, tiny.processor, heldout, {"fp": resolve("fitprune:40")}, repeats=1)


# ----------------------------------------------------------------------------------- presets
def test_preset_fingerprint_is_llava_15_7b_built_on_the_meta_device():
    from recipe_compiler.families import config_from_dict
    from recipe_compiler.models import REGISTRY, _random_model

    model = _random_model(config_from_dict(REGISTRY["llava-1.5-7b"].config), device="meta", dtype=torch.float16,
                          attn_implementation="sdpa", seed=0)
    assert model_fingerprint(model) == LLAVA_15_7B_FINGERPRINT


def test_pruned_at_the_end_of_a_layer_is_gone_on_entry_to_the_next():
    assert keep_counts_from_pruned([1, 2, 0, 5], 10).tolist() == [10, 9, 7, 7]
    with pytest.raises(RecipeError, match="non-negative"):
        keep_counts_from_pruned([1, -2, 0], 10)
    with pytest.raises(RecipeError, match="only 3 exist"):
        keep_counts_from_pruned([2, 2, 0], 3)


@pytest.mark.parametrize("ratio", ["0", "10", "40", "55", "90"])
def test_fitprune_published_recipes_load_as_llava_15_7b_presets(ratio, monkeypatch):
    monkeypatch.delenv("RECIPE_FITPRUNE_PUBLISHED", raising=False)
    pruned = json.loads(PUBLISHED.read_text())["llava-1.5-7b"][ratio]
    recipe = fitprune_published(ratio, PUBLISHED)
    assert recipe.fingerprint == LLAVA_15_7B_FINGERPRINT and recipe.num_layers == 32
    assert recipe.keep_count[0] == 576
    for layer in range(31):
        assert recipe.keep_count[layer + 1] == recipe.keep_count[layer] - pruned[layer]
    assert resolve(f"fitprune:{ratio}@{PUBLISHED}").keep_count.tolist() == recipe.keep_count.tolist()
    assert resolve(f"fitprune:{ratio}").keep_count.tolist() == recipe.keep_count.tolist()
    from runtime.recipe import from_bytes

    again = from_bytes(recipe.to_bytes())
    assert again.keep_count.tolist() == recipe.keep_count.tolist()


def test_the_packaged_published_recipes_are_the_conformance_file_with_their_source_named():
    from runtime import presets

    assert presets.PACKAGED_PATH.read_bytes() == PUBLISHED.read_bytes()
    note = (presets.PACKAGED_PATH.parent / "README.md").read_text()
    assert "https://github.com/ywh187/FitPrune" in note and "arXiv:2409.10197" in note
    assert "https://github.com/ywh187/FitPrune" in presets.__doc__


def test_fitprune_preset_works_from_an_installed_runtime_alone(tmp_path):
    """``fitprune:40`` in a process that sees only the runtime package: no checkout, no environment variable."""
    import os
    import shutil
    import subprocess
    import sys

    import runtime

    site = tmp_path / "site"
    shutil.copytree(Path(runtime.__file__).parent, site / "runtime", ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k not in ("RECIPE_FITPRUNE_PUBLISHED", "PYTHONPATH")}
    code = ("import sys; sys.path.insert(0, sys.argv[1]); "  # -I: no cwd, no PYTHONPATH; the copy comes first
            "import runtime.presets as p; r = p.resolve('fitprune:40'); print(p.__file__); print(r.keep_count[:4].tolist())")
    out = subprocess.run([sys.executable, "-I", "-c", code, str(site)], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    where, counts = out.stdout.splitlines()
    assert where.startswith(str(site)) and counts == "[576, 576, 575, 554]"


def test_a_named_file_overrides_the_environment_which_overrides_the_packaged_recipes(tmp_path, monkeypatch):
    def table(first_pruned):
        data = json.loads(PUBLISHED.read_text())
        data["llava-1.5-7b"]["40"] = [first_pruned] + data["llava-1.5-7b"]["40"][1:]
        return data

    from_env, named = tmp_path / "env.json", tmp_path / "named.json"
    from_env.write_text(json.dumps(table(7)))
    named.write_text(json.dumps(table(9)))
    monkeypatch.delenv("RECIPE_FITPRUNE_PUBLISHED", raising=False)
    assert resolve("fitprune:40").keep_count[1] == 576  # packaged: FitPrune prunes nothing at the end of layer 0
    monkeypatch.setenv("RECIPE_FITPRUNE_PUBLISHED", str(from_env))
    assert resolve("fitprune:40").keep_count[1] == 576 - 7
    assert resolve(f"fitprune:40@{named}").keep_count[1] == 576 - 9


def test_presets_import_only_numpy_and_the_runtime():
    import subprocess
    import sys

    code = "import sys, runtime.presets; bad = [m for m in ('torch', 'transformers') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    # runtime/__init__ may import torch for the pruner; the preset module itself adds nothing heavier
    assert "transformers" not in out.stdout


# ---------------------------------------------------------------------------------- pictures
def _red(tmp_path):
    from PIL import Image

    path = tmp_path / "red.png"
    Image.new("RGB", (96, 96), (255, 0, 0)).save(path)
    return path


def test_schedule_and_kept_token_pictures_have_their_size_and_show_the_image_under_the_overlay(tiny, recipe25, tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    from recipe_compiler.plots import DROPPED_ALPHA, PANEL_PX, SCHEDULE_SIZE_PX, kept_tokens, plot_kept_tokens, plot_schedules

    _, recipe = recipe25
    keep_all = Recipe.keep_all(model_fingerprint(tiny.model))
    schedule = plot_schedules({"b25": recipe, "keep-all": keep_all}, tmp_path / "schedule.png")
    with Image.open(schedule) as im:
        assert im.size == SCHEDULE_SIZE_PX
        pixels = np.asarray(im.convert("RGB")).reshape(-1, 3)
        assert len(np.unique(pixels, axis=0)) > 10  # lines and text, not a blank canvas

    image = _red(tmp_path)
    layer = recipe.pruning_layers[0]
    layers = [0, layer, recipe.num_layers - 1]
    kept = kept_tokens(tiny, recipe, image, layers)["kept"]
    for name, r in (("b25", recipe), ("all", keep_all)):
        png = plot_kept_tokens(tiny, r, image, layers, tmp_path / f"tokens-{name}.png", title=name)
        with Image.open(png) as im:
            assert im.size == (PANEL_PX[0] * len(layers), PANEL_PX[1])
            rgb = np.asarray(im.convert("RGB")).astype(int)
        width = PANEL_PX[0]
        for i, l in enumerate(layers):
            panel = rgb[:, i * width:(i + 1) * width].reshape(-1, 3)
            bright = np.sum((panel[:, 0] > 240) & (panel[:, 1] < 15) & (panel[:, 2] < 15))  # the image, kept
            dark_red = round(255 * (1 - DROPPED_ALPHA))
            dark = np.sum((abs(panel[:, 0] - dark_red) < 12) & (panel[:, 1] < 15) & (panel[:, 2] < 15))  # the image, darkened
            assert bright > 0
            dropped_share = dark / (bright + dark)
            expected = 0.0 if name == "all" else 1 - kept[l].mean()  # layer 0 too: a pre-LLM stage drops there
            assert dropped_share == pytest.approx(expected, abs=0.03), (name, l)


def test_cli_writes_the_pictures(tiny, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    keep = tmp_path / "keep.safetensors"
    Recipe.keep_all(model_fingerprint(tiny.model)).save(keep)
    code, out, err = _run(capsys, ["--model", "tiny-llava", "--recipe", str(keep), "--samples", "1", "--new-tokens", "1",
                                   "--repeats", "1", "--show", str(_red(tmp_path)), "--layers", "1,4", "--out", str(tmp_path / "pics")])
    assert code == 0, err
    assert (tmp_path / "pics" / "schedule.png").is_file() and (tmp_path / "pics" / "tokens-keep.png").is_file()
    assert "wrote" in out


# --------------------------------------------------------------------------------- lmms-eval
def _lmms_python():
    """An interpreter with lmms-eval and this package: $LMMS_EVAL_PYTHON (scripts/lmms-env.sh builds one), else this one.

    ``None`` when neither has them (the test skips); a named interpreter that cannot import them fails the test,
    so a CI step that sets the variable never passes on a skip.
    """
    import os
    import subprocess
    import sys

    named = os.environ.get("LMMS_EVAL_PYTHON")
    python = named or sys.executable
    probe = subprocess.run([python, "-c", "import lmms_eval, recipe_compiler"], capture_output=True, text=True)
    if probe.returncode != 0 and named:
        last = (probe.stderr.strip().splitlines() or ["(no output)"])[-1]
        pytest.fail(f"LMMS_EVAL_PYTHON={named} cannot import lmms_eval and recipe_compiler: {last}")
    return python if probe.returncode == 0 else None


def _lmms_results(output_path, task):
    """The results lmms-eval wrote for ``task`` under ``--output_path`` (its *_results.json), or ``None``."""
    for path in sorted(Path(output_path).rglob("*results*.json")):
        try:
            results = json.loads(path.read_text()).get("results", {})
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(results, dict) and isinstance(results.get(task), dict):
            return results[task]
    return None


def test_lmms_eval_plugin_evaluates_a_pruned_tiny_llava_on_a_local_task(tiny, tmp_path):
    import subprocess
    import sys

    python = _lmms_python()
    if python is None:
        pytest.skip("lmms-eval is not installed (scripts/lmms-env.sh builds an environment; set LMMS_EVAL_PYTHON to its python)")
    sys.path.insert(0, str(Path(__file__).parent / "lmms_task"))
    from make_task import make_task

    task = make_task(tmp_path / "task")
    recipe = tmp_path / "r.safetensors"
    Recipe(keep_count=np.array([576] + [100] * 7), scorer="fitprune", fingerprint=model_fingerprint(tiny.model)).save(recipe)
    script = "import sys; from lmms_eval.__main__ import cli_evaluate; sys.argv[0] = 'lmms-eval'; cli_evaluate()"
    result = subprocess.run(
        [python, "-c", script, "--model", "recipe_llava", "--model_args", f"pretrained=tiny-llava,recipe={recipe}",
         "--include_path", str(task), "--tasks", "tiny_recipe", "--batch_size", "1", "--output_path", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    # lmms-eval exits 0 on some failures (an import error inside it, a task that did not load): the run counts
    # only when the plugin pruned and the results file holds the task's metric for every question.
    assert "recipe_llava: pruning active; visual tokens entering each layer [576, 100, 100" in log, log[-3000:]
    results = _lmms_results(tmp_path / "out", "tiny_recipe")
    assert results is not None, "lmms-eval wrote no results for tiny_recipe (exit 0 notwithstanding):\n" + log[-3000:]
    scores = {key: value for key, value in results.items() if key.startswith("exact_match") and "stderr" not in key}
    assert scores and all(isinstance(v, (int, float)) and 0 <= v <= 1 for v in scores.values()), results


def test_an_lmms_eval_run_without_results_does_not_count_as_passing(tmp_path):
    # The check the plugin test relies on when lmms-eval exits 0 after failing: no results file, no pass.
    assert _lmms_results(tmp_path, "tiny_recipe") is None
    (tmp_path / "recipe_llava").mkdir()
    (tmp_path / "recipe_llava" / "20260101_results.json").write_text(json.dumps({"results": {"other_task": {"exact_match,none": 1.0}}}))
    assert _lmms_results(tmp_path, "tiny_recipe") is None
    (tmp_path / "recipe_llava" / "20260102_results.json").write_text(
        json.dumps({"results": {"tiny_recipe": {"alias": "tiny_recipe", "exact_match,none": 0.0, "exact_match_stderr,none": 0.0}}}))
    assert _lmms_results(tmp_path, "tiny_recipe")["exact_match,none"] == 0.0


def test_recipe_inspect_prints_a_fitprune_preset(capsys):
    from recipe_compiler.cli import inspect_main

    assert inspect_main(["fitprune:40", "--json"]) == 0
    described = json.loads(capsys.readouterr().out)
    assert described["fingerprint"] == LLAVA_15_7B_FINGERPRINT and described["keep_count"][:4] == [576, 576, 575, 554]
    assert inspect_main(["fitprune:41"]) == 1
    assert "no '41'% recipe" in capsys.readouterr().err

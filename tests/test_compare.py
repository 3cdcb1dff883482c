"""``recipe-eval --compare``: names resolve through the registries, stages alone meet the budget, the table and plot come out."""
from __future__ import annotations

import json

import pytest

from conftest import run_cli
from recipe_compiler.compare import COMPARISONS, alone_ratio, parse_budgets, parse_methods, register_comparison, resolve


def test_a_name_resolves_through_the_registries_not_a_switch():
    from recipe_compiler.search import SEARCHES
    from runtime.methods.stages import STAGES

    assert resolve("gprune") == ({"pre_llm": "g-prune"}, True, "")
    for name in STAGES:
        options, _, _ = resolve(name)
        assert options == {"pre_llm": name}
    assert resolve("visionzip")[1] is True and resolve("prumerge-plus")[1] is False  # a count of its own: with the schedule
    for name in SEARCHES:
        assert resolve(name)[0]["search"] == name
    options, _, reason = resolve("surely-not-a-method")
    assert options is None and "surely-not-a-method" in reason and "visionzip" in reason


def test_a_registered_comparison_is_picked_up_by_name():
    register_comparison("test-gsearch", search="gsearch")
    try:
        assert resolve("test-gsearch") == ({"search": "gsearch"}, False, "")
    finally:
        COMPARISONS.unregister("test-gsearch")


@pytest.mark.parametrize("text, message", [("0.45,x", "numbers"), ("0", r"\(0, 1\]"), ("1.5", r"\(0, 1\]")])
def test_bad_budgets_are_refused_naming_the_entry(text, message):
    with pytest.raises(ValueError, match=message):
        parse_budgets(text)


def test_methods_parse_in_order_once():
    assert parse_methods("visionzip, divprune,visionzip") == ["visionzip", "divprune"]
    with pytest.raises(ValueError):
        parse_methods(" , ")


def test_a_stage_alone_meets_the_budget_at_its_ratio(tiny, calibration):
    from recipe_compiler.collect import collect_statistics
    from recipe_compiler.flops import LMShape
    from recipe_compiler.prellm_search import survivors
    from recipe_compiler.flops import cost_table
    import numpy as np

    stats = collect_statistics(tiny.model, tiny.processor, calibration, format_prompt=tiny.format_prompt)
    shape = LMShape.from_config(tiny.model.config.text_config)
    for method in ("visionzip", "divprune"):
        ratio = alone_ratio(stats, shape, 576, method, 0.3)
        full = float(np.sum(cost_table(shape, stats.n_other, stats.n_visual, 576)[:, 576]))
        spent = float(np.sum(cost_table(shape, stats.n_other, survivors(stats, method, ratio).sum(axis=1), 576)[:, 576])) / full
        more = float(np.sum(cost_table(shape, stats.n_other, survivors(stats, method, min(1.0, ratio + 0.01)).sum(axis=1), 576)[:, 576])) / full
        assert spent <= 0.3 < more


def test_cli_compare_prints_the_table_writes_the_plot_and_lists_unavailable_methods(tmp_path, capsys):
    from recipe_compiler.evaluate import main

    code, out, err = run_cli(capsys, ["--model", "tiny-llava", "--compare", "no-such-method,divprune,optimal", "--budget", "0.45",
                                      "--calibration-samples", "2", "--samples", "2", "--repeats", "1", "--new-tokens", "2",
                                      "--out", str(tmp_path)], main=main)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["method", "budget", "calib", "flops"]
    assert any(line.startswith("no-such-method") and "not available" in line for line in lines)
    for method in ("divprune", "optimal"):
        row = next(line for line in lines if line.startswith(method + " "))
        assert float(row.split()[2]) <= 0.45 * (1 + 1e-9)  # the budget holds on the calibration set
    payload = json.loads((tmp_path / "compare.json").read_text())
    assert [r["method"] for r in payload["rows"]] == ["no-such-method", "divprune", "optimal"]
    assert payload["rows"][1]["evaluation"]["kv_fraction"] < 1
    assert (tmp_path / "compare.png").stat().st_size > 0


@pytest.mark.parametrize("argv, message", [
    (["--compare", "optimal"], "--budget"),
    (["--budget", "0.4"], "--compare"),
    (["--compare", "optimal", "--budget", "0.4", "--recipe", "x.safetensors"], "drop --recipe"),
    ([], "--recipe"),
])
def test_cli_compare_option_errors_are_one_line(argv, message, capsys):
    from recipe_compiler.evaluate import main

    code, _, err = run_cli(capsys, ["--model", "tiny-llava", *argv], main=main)
    assert code != 0 and message in err and len(err.strip().splitlines()) == 1

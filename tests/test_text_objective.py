"""The ``text`` objective: text-only calibration statistics (no visual query row) and the divergence of the
text queries' attention alone.

What a user relies on: ``--objective text`` compiles a recipe within budget from a calibration pass that never
computes a visual query row, whose text and last-token statistics are those of the full pass; the search then
minimises the text term alone; saved text-only statistics round-trip and are refused for the default objective;
combinations that need the visual rows are refused before any forward, naming the fix.
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import run_cli
from recipe_compiler.collect import collect_statistics
from recipe_compiler.compile import CompileConfig, compile_recipe
from recipe_compiler.divergence import divergence_table, kept_set_divergence
from recipe_compiler.errors import StatisticsError
from recipe_compiler.statistics import Statistics, load_statistics, save_statistics
from runtime import attention, load


@pytest.fixture(scope="module")
def full(tiny, calibration):
    return collect_statistics(tiny.model, tiny.processor, calibration, format_prompt=tiny.format_prompt, batch_size=3)


@pytest.fixture(scope="module")
def text_only(tiny, calibration):
    return collect_statistics(tiny.model, tiny.processor, calibration, format_prompt=tiny.format_prompt, batch_size=3, rows="text")


def test_text_only_statistics_are_the_full_passes_text_and_last_rows(full, text_only):
    assert text_only.text_only and text_only.self_attn is None and not full.text_only
    np.testing.assert_allclose(text_only.cross, full.cross, rtol=1e-5, atol=1e-7, equal_nan=True)
    np.testing.assert_allclose(text_only.last, full.last, rtol=1e-5, atol=1e-7, equal_nan=True)
    assert (text_only.n_visual == full.n_visual).all() and (text_only.n_text == full.n_text).all()


def test_the_text_only_pass_computes_no_visual_query_row(tiny, calibration, monkeypatch):
    first_rows = []
    original = attention.attention_row_sums

    def spy(query, key, mask, scaling, row_weights, *args, **kwargs):
        first_rows.append(int(row_weights.abs().sum(dim=(0, 1)).nonzero().min()))
        visual_rows.append(row_weights.shape[1])
        return original(query, key, mask, scaling, row_weights, *args, **kwargs)

    visual_rows: list = []
    monkeypatch.setattr(attention, "attention_row_sums", spy)
    sample = calibration.__class__(calibration.samples[:1], "one")  # batch 1, unpadded: the rows are the prompt's own
    stats = collect_statistics(tiny.model, tiny.processor, sample, format_prompt=tiny.format_prompt, rows="text")
    last_visual = int(stats.before_image[0] + stats.n_visual[0]) - 1
    assert first_rows and min(first_rows) > last_visual  # every probed row is a text row after the image
    assert set(visual_rows) == {2}  # two groups: text rows, last row


def test_the_text_divergence_is_the_text_term_alone(full):
    text = full.text_rows_only()
    table = divergence_table(text, "text-mean")
    S, L, V = full.cross.shape
    n = full.n_visual
    # by hand at layer 2, keeping the top half by layer 1's text attention
    k = V // 2
    total = 0.0
    for s in range(S):
        scores = full.cross[s, 1, : n[s]].astype(np.float64)
        p = full.cross[s, 2, : n[s]].astype(np.float64)
        p = p / p.sum()
        keep_s = int(np.floor(k * n[s] / V + 0.5))
        order = np.lexsort((-np.arange(n[s]), -scores))  # best first; ties: the later position
        lost = p[order[keep_s:]].sum()
        total += -np.log(max(1.0 - lost, 1e-6))
    assert table[2, k] == pytest.approx(total / S, rel=1e-9)
    alive = np.ones((S, L, V), dtype=bool)
    alive[:, 1:, 0] = False
    both, one = kept_set_divergence(full, alive), kept_set_divergence(text, alive)
    assert not np.allclose(both, one)  # the visual term is really gone


def test_compile_with_the_text_objective_meets_the_budget_and_records_it(tiny, calibration):
    result = compile_recipe(tiny.model, tiny.processor, calibration, CompileConfig(0.45, objective="text", scorer="text-mean"),
                            format_prompt=tiny.format_prompt)
    assert result.statistics.text_only
    assert result.verification.flops_fraction <= 0.45 * (1 + 1e-9)
    assert result.recipe.provenance["objective"] == "text" and result.recipe.scorer == "text-mean"


def test_full_statistics_serve_the_text_objective_and_give_the_same_recipe(tiny, calibration, full, text_only):
    config = CompileConfig(0.45, objective="text", scorer="text-mean")
    reused = compile_recipe(tiny.model, tiny.processor, calibration, config, format_prompt=tiny.format_prompt, statistics=full)
    own = compile_recipe(tiny.model, tiny.processor, calibration, config, format_prompt=tiny.format_prompt, statistics=text_only)
    assert reused.recipe.keep_count.tolist() == own.recipe.keep_count.tolist()


def test_text_only_statistics_round_trip_and_are_refused_for_the_default_objective(tiny, calibration, text_only, tmp_path):
    path = tmp_path / "stats.safetensors"
    save_statistics(text_only, path)
    back = load_statistics(path)
    assert isinstance(back, Statistics) and back.text_only
    np.testing.assert_array_equal(back.cross, text_only.cross)
    with pytest.raises(StatisticsError, match="text-only.*--objective text"):
        compile_recipe(tiny.model, tiny.processor, calibration, CompileConfig(0.45), format_prompt=tiny.format_prompt, statistics=back)


@pytest.mark.parametrize("options, message", [
    ({"objective": "text"}, "fitprune scorer ranks by them; use --scorer text-mean"),
    ({"objective": "text", "scorer": "text-mean", "search": "fitprune"}, "--search fitprune weighs them"),
    ({"objective": "visual"}, "objective 'visual' is unknown; choose one of text\\+visual, text"),
])
def test_configurations_that_need_the_visual_rows_are_refused_naming_the_fix(options, message):
    with pytest.raises(ValueError, match=message):
        CompileConfig(0.45, **options)


def test_cli_objective_text_writes_a_recipe_in_budget(capsys, tmp_path):
    out = tmp_path / "r.safetensors"
    code, stdout, stderr = run_cli(capsys, ["--model", "tiny-llava", "--budget", "0.45", "--objective", "text", "--scorer", "last-token",
                                            "--samples", "3", "-o", str(out)])
    assert code == 0, stderr
    recipe = load(out)
    assert recipe.provenance["objective"] == "text" and recipe.provenance["flops_fraction"] <= 0.45 * (1 + 1e-9)
    code, _, stderr = run_cli(capsys, ["--model", "tiny-llava", "--budget", "0.45", "--objective", "text", "-o", str(tmp_path / "x.safetensors")])
    assert code != 0 and "use --scorer text-mean" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "x.safetensors").exists()

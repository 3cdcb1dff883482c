"""``recipe-eval --compare``: every method compiled at every budget, measured on the same held-out samples.

A method name maps to compile options (:class:`recipe_compiler.compile.CompileConfig` fields)
through registries, never a switch in this module:

1. :data:`COMPARISONS`, names registered with :func:`register_comparison` (``default``: the
   compile with no options, i.e. ``--pre-llm auto``; our searches under their short names, in the
   language model alone; the seed stages under the names papers use: ``gprune``, ``fopru``);
2. otherwise a pre-LLM stage of that name (:data:`runtime.methods.stages.STAGES`): a
   fixed-ratio stage runs **alone**, as its paper runs it, at the largest keep ratio whose FLOPs
   meet the budget (no in-LLM schedule); a stage with its own count gets the schedule search for
   the rest;
3. otherwise a schedule search of that name (:data:`recipe_compiler.search.SEARCHES`; the peer
   in-LLM methods FastV, PyramidDrop, … register theirs there), with no pre-LLM stage.

A name none of them knows is listed as unavailable with the reason, so a method appears in the
comparison as soon as its module is registered. Each method is compiled at each budget on the
calibration set (one calibration pass per head reduction, shared by all methods), then measured
with :func:`recipe_compiler.evaluate.evaluate_recipes` on the held-out samples: verified FLOPs,
KL, top-1 agreement, greedy-continuation match, prefill time and KV-cache bytes.
``recipe-eval --compare`` (:mod:`recipe_compiler.evaluate`) is the command line.

Example:
    >>> resolve("gprune")[0]
    {'pre_llm': 'g-prune'}
    >>> resolve("no-such-method")[0] is None
    True
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from runtime.methods.stages import STAGES
from runtime.registry import Registry

from .calibration import CalibrationSet

UNAVAILABLE = "not available in this build"

COMPARISONS = Registry("comparison method")
"""name → :class:`Comparison`: names whose compile options are not simply a stage's or a search's name."""


@dataclass(frozen=True)
class Comparison:
    """One method of ``--compare``.

    Attributes:
        name: as ``--compare`` spells it.
        options: :class:`~recipe_compiler.compile.CompileConfig` fields (besides the budget).
        alone: a fixed-ratio pre-LLM stage runs alone at the keep ratio that meets the budget.
    """

    name: str
    options: dict = field(default_factory=dict)
    alone: bool = False


def register_comparison(name: str, alone: bool = False, **options: Any) -> Comparison:
    """Register ``name`` for ``--compare`` with its compile options.

    Example:
        >>> register_comparison("my-ours", search="gsearch")   # doctest: +SKIP
    """
    entry = Comparison(name, dict(options), alone)
    COMPARISONS.register(name, entry)
    return entry


register_comparison("default")  # what recipe-compile does with no options: optimal with --pre-llm auto
register_comparison("optimal", search="optimal", pre_llm="none")  # ours in the language model alone: the exact searched schedule
register_comparison("fitprune", search="fitprune")  # FitPrune's model-in-the-loop bisection
register_comparison("gprune", alone=True, pre_llm="g-prune")
register_comparison("fopru", alone=True, pre_llm="fopru-rank")


def resolve(name: str) -> tuple[dict | None, bool, str]:
    """The compile options of ``--compare`` method ``name``.

    Returns:
        ``(options, alone, reason)``: ``options`` is ``None`` when no registry knows the name, and
        ``reason`` then says so.
    """
    from .search import SEARCHES

    if name in COMPARISONS:
        entry = COMPARISONS[name]
        return dict(entry.options), entry.alone, ""
    if name in STAGES:
        return {"pre_llm": name}, STAGES[name].fixed_ratio and not STAGES[name].own_schedule, ""
    if name in SEARCHES:  # the search's own schedule, in the language model alone
        return {"search": name, "pre_llm": "none"}, False, ""
    return None, False, (f"{UNAVAILABLE}: no comparison, pre-LLM stage or schedule search is named {name!r} "
                         f"(known: {', '.join(known_names())})")


def known_names() -> list[str]:
    """Every name ``--compare`` resolves, sorted."""
    from .search import SEARCHES

    return sorted(set(COMPARISONS) | set(STAGES) | set(SEARCHES))


def parse_budgets(text: str) -> list[float]:
    """``"0.45,0.25"`` → ``[0.45, 0.25]``; ValueError naming a bad entry."""
    out = []
    for part in text.split(","):
        part = part.strip()
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"--budget entries must be numbers in (0, 1] such as 0.45,0.25, got {part!r}") from None
        if not math.isfinite(value) or not 0 < value <= 1:
            raise ValueError(f"--budget entries must be numbers in (0, 1], got {part!r}")
        out.append(value)
    if not out:
        raise ValueError("--budget needs at least one number in (0, 1]")
    return out


def parse_methods(text: str) -> list[str]:
    """``"fastv,visionzip"`` → the names, in order, each once; ValueError for an empty list."""
    names = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    if not names:
        raise ValueError("--compare needs method names separated by commas, e.g. visionzip,divprune,optimal")
    return names


@dataclass
class Row:
    """One (method, budget) of the comparison: its measurements, or why there are none."""

    method: str
    budget: float
    options: dict = field(default_factory=dict)
    evaluation: Any = None
    error: str = ""
    compile_seconds: float = 0.0
    calibration_flops: float = float("nan")  # the compile's verified FLOPs fraction on the calibration set (meets the budget)
    pre_llm: dict = field(default_factory=dict)
    search: str = ""

    def as_dict(self) -> dict:
        out = {"method": self.method, "budget": self.budget, "options": self.options, "error": self.error,
               "compile_seconds": round(self.compile_seconds, 3),
               "calibration_flops": self.calibration_flops, "pre_llm": self.pre_llm, "search": self.search}
        out["evaluation"] = asdict(self.evaluation) if self.evaluation is not None else None
        return out


def alone_ratio(statistics: Any, shape: Any, v_ref: int, method: str, budget: float) -> float | None:
    """The largest keep ratio at which fixed-ratio stage ``method`` alone meets ``budget`` on ``statistics``.

    Bisection on the ratio with the runtime's own survivors (:func:`recipe_compiler.prellm_search.survivors`);
    ``None`` when even ratio 0 does not fit.
    """
    from .flops import cost_table
    from .prellm_search import survivors

    unpruned = float(np.sum(cost_table(shape, statistics.n_other, statistics.n_visual, v_ref)[:, v_ref]))

    def fraction(ratio: float) -> float:
        alive = survivors(statistics, method, ratio)
        return float(np.sum(cost_table(shape, statistics.n_other, alive.sum(axis=1), v_ref)[:, v_ref])) / unpruned

    if fraction(1.0) <= budget:
        return 1.0
    if fraction(0.0) > budget:
        return None
    low, high = 0.0, 1.0  # fraction(low) <= budget < fraction(high)
    for _ in range(30):
        mid = (low + high) / 2
        if fraction(mid) <= budget:
            low = mid
        else:
            high = mid
    return round(low, 9) if fraction(round(low, 9)) <= budget else low


def run_comparison(
    model: Any,
    processor: Any,
    calibration: CalibrationSet,
    heldout: CalibrationSet,
    methods: Sequence[str],
    budgets: Sequence[float],
    *,
    measure: Callable[..., list],
    format_prompt: Callable[[str], str] = lambda p: p,
    batch_size: int = 4,
    new_tokens: int = 8,
    repeats: int = 3,
    device: str = "cpu",
    say: Callable[[str], None] = lambda line: None,
) -> list[Row]:
    """Compile every method at every budget on ``calibration`` and measure each on ``heldout``.

    Args:
        model, processor, format_prompt: the loaded model.
        calibration: the samples recipes are compiled on.
        heldout: the samples they are measured on.
        methods: ``--compare`` names (:func:`resolve`).
        budgets: FLOPs budgets.
        batch_size, new_tokens, repeats, device: as ``recipe-eval``.
        say: progress lines (one per compiled recipe).
        measure: ``measure(model, processor, samples, recipes, **options) -> evaluations``:
            :func:`recipe_compiler.evaluate.evaluate_recipes` (passed in, since ``recipe-eval``'s
            module imports this one).

    Returns:
        One :class:`Row` per method and budget, methods in the given order.
    """
    import time

    from runtime.families import family_for, model_fingerprint

    from .collect import collect_statistics
    from .compile import CompileConfig, compile_recipe
    from .families import lm_shape
    from .flops import LMShape

    shape = lm_shape(model)
    v_ref = model_fingerprint(model)["visual_tokens"]
    statistics: dict[str, Any] = {}
    rows: list[Row] = []
    recipes: dict[str, Any] = {}
    for method in methods:
        options, alone, reason = resolve(method)
        for budget in budgets:
            row = Row(method, budget, dict(options or {}))
            rows.append(row)
            if options is None:
                row.error = reason
                continue
            started = time.perf_counter()
            try:
                config = CompileConfig(budget=budget, batch_size=batch_size, **options)
                head = config.head_reduce
                if head not in statistics:
                    statistics[head] = collect_statistics(model, processor, calibration, format_prompt=format_prompt,
                                                          batch_size=batch_size, head_reduce=head)
                stats = statistics[head]
                if alone:
                    ratio = alone_ratio(stats, shape, v_ref, config.pre_llm, budget)
                    if ratio is not None:
                        row.options["pre_llm_ratio"] = ratio
                        config = CompileConfig(budget=budget, batch_size=batch_size, **row.options)
                result = compile_recipe(model, processor, calibration, config, format_prompt=format_prompt, statistics=stats)
            except Exception as exc:  # noqa: BLE001 - one method's failure is a line of the table, not the end
                row.error = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
                say(f"{method} @ {budget:g}: {row.error}")
                continue
            row.compile_seconds = time.perf_counter() - started
            row.calibration_flops = float(result.verification.flops_fraction)
            row.pre_llm = dict(result.recipe.pre_llm)
            row.search = str(result.recipe.provenance.get("search", config.search))
            recipes[f"{method}@{budget:g}"] = (row, result.recipe)
            say(f"{method} @ {budget:g}: compiled in {row.compile_seconds:.1f}s (flops {result.verification.flops_fraction:.4f} on calibration)")
    if recipes:
        evaluations = measure(model, processor, heldout, {name: recipe for name, (_, recipe) in recipes.items()},
                                       format_prompt=format_prompt, new_tokens=new_tokens, batch_size=batch_size,
                                       repeats=repeats, device=device)
        for (row, _), evaluation in zip(recipes.values(), evaluations):
            row.evaluation = evaluation
    return rows


def format_comparison(rows: Sequence[Row]) -> str:
    """The comparison table (one line per method and budget; unavailable or failed ones say why)."""
    header = (f"{'method':<14} {'budget':>6} {'calib':>7} {'flops':>7} {'vis.tok':>8} {'KL':>10} {'top1':>6} {'greedy':>7} {'exact':>6} "
              f"{'prefill':>7} {'KV frac':>8}  how")
    lines = [header, "-" * len(header)]
    unavailable: list[str] = []
    for row in rows:
        e = row.evaluation
        if e is None and row.error.startswith(UNAVAILABLE):
            if row.method not in unavailable:
                unavailable.append(row.method)
                lines.append(f"{row.method:<14} {'all':>6}  {UNAVAILABLE} (no comparison, pre-LLM stage or schedule search of that name)")
            continue
        if e is None:
            lines.append(f"{row.method:<14} {row.budget:>6g}  {row.error}")
            continue
        how = _how(row)
        lines.append(
            f"{row.method:<14} {row.budget:>6g} {row.calibration_flops:>7.4f} {e.flops_fraction:>7.4f} {e.mean_visual_tokens:>8.1f} {e.kl:>10.4g} "
            f"{e.top1_agreement:>6.3f} {e.greedy_match:>7.3f} {e.greedy_exact:>6.3f} {e.prefill_ratio:>7.3f} {e.kv_fraction:>8.4f}  {how}"
        )
    done = [row.evaluation for row in rows if row.evaluation is not None]
    if done:
        e = done[0]
        lines.append(
            f"{e.samples} held-out samples; calib = verified language-model prefill FLOPs fraction on the calibration set "
            f"(what the budget bounds); flops = the same on the held-out samples; vis.tok = mean visual tokens "
            f"per layer; greedy = token agreement over {e.new_tokens} greedy tokens, exact = whole continuation; prefill = "
            f"pruned/unpruned median wall time over {e.repeats} alternating runs (batch {e.timed_batch}); KV frac = KV-cache bytes pruned/unpruned"
        )
    if unavailable:
        lines.append(f"known names: {', '.join(known_names())}")
    return "\n".join(lines)


def _how(row: Row) -> str:
    stage = row.pre_llm.get("method", "none")
    parts = []
    if stage != "none":
        ratio = row.pre_llm.get("keep_ratio")
        parts.append(f"{stage}" + (f" {ratio:.3f}" if ratio is not None else ""))
    parts.append(f"search {row.search}")
    return ", ".join(parts)


def plot_comparison(rows: Sequence[Row], path: Any) -> Any:
    """Quality vs FLOPs, one line per method: KL (log) and top-1 agreement against the verified FLOPs fraction."""
    from .plots import require_matplotlib

    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    methods = list(dict.fromkeys(row.method for row in rows if row.evaluation is not None))
    for method in methods:
        points = sorted((row.evaluation.flops_fraction, row.evaluation.kl, row.evaluation.top1_agreement)
                        for row in rows if row.method == method and row.evaluation is not None)
        x = [p[0] for p in points]
        left.plot(x, [max(p[1], 1e-9) for p in points], marker="o", label=method)
        right.plot(x, [p[2] for p in points], marker="o", label=method)
    left.set_yscale("log")
    left.set_xlabel("verified prefill FLOPs fraction")
    left.set_ylabel("KL(unpruned ‖ pruned), nats (lower is better)")
    right.set_xlabel("verified prefill FLOPs fraction")
    right.set_ylabel("top-1 agreement (higher is better)")
    right.legend(fontsize=8, loc="best")
    for axis in (left, right):
        axis.grid(alpha=0.3)
    fig.suptitle("quality vs FLOPs on held-out samples")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

"""``recipe-eval``: what one or more recipes cost in behaviour and buy in speed, on held-out samples.

For each recipe, pruned against unpruned on the same prompts:

* next-token KL divergence and top-1 agreement, and the exact FLOPs fraction from the token counts
  that really entered each layer (all three from :func:`recipe_compiler.verify.verify_recipe`);
* greedy continuation match over ``new_tokens`` tokens (``generate`` with and without the recipe):
  the mean fraction of positions whose token agrees, and the share of samples whose continuation
  is identical;
* exact-match accuracy when the data has answers (a manifest's ``"answer"``): the greedy
  continuation's first words against the answer, for the unpruned model and each recipe, overall
  and per question type (``"qtype"``), with the number of questions and a 95 % Wilson interval;
* measured prefill time ratio (pruned / unpruned, medians of alternating runs on the first batch)
  and the KV-cache bytes the prefill returns;
* beside the language-model figures: the vision encoder + projector FLOPs per sample and their
  share of the unpruned total, the end-to-end fraction (encoder + pruned prefill over encoder +
  unpruned prefill) and the visual-token-only fraction (what FitPrune-style papers quote).

Several recipes give one comparison table; ``--json`` prints the same numbers as JSON.
``--compare M1,M2,... --budget B1,B2`` compiles each method at each budget on the calibration set
first and compares them all (:mod:`recipe_compiler.compare`); with ``--out DIR`` it also writes
``compare.png`` (quality vs FLOPs, one line per method) and ``compare.json``.
``--show IMAGE --layers 2,8,16 --out DIR`` also draws the schedules and, for that image, which
visual tokens survive at those layers (needs matplotlib: ``pip install 'recipe-compiler[plots]'``).

    recipe-eval --model tiny-llava --recipe r.safetensors
    recipe-eval --model llava-1.5-7b --recipe ours.safetensors --recipe fitprune:40 --json
    recipe-eval --model tiny-llava --compare visionzip,divprune,gprune,fopru,fitprune,optimal --budget 0.45,0.25 --out cmp
"""
from __future__ import annotations

import argparse
import json
import statistics as _stats
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from runtime.errors import RecipeError
from runtime.recipe import Recipe

from .calibration import CalibrationSet
from .cli_common import (
    EXIT_FAILURE, check_device, check_output_file, one_line,
)
from .collect import check_inputs, model_inputs
from .distributed import batches_of
from .errors import CompileError
from .verify import verify_recipe


@dataclass
class Evaluation:
    """One recipe's measurements against the unpruned model (see the module docstring)."""

    name: str
    flops_fraction: float
    mean_visual_tokens: float  # mean over layers of the visual tokens that entered each layer
    kl: float
    top1_agreement: float
    greedy_match: float  # mean fraction of the new_tokens greedy tokens that agree
    greedy_exact: float  # share of samples whose whole greedy continuation agrees
    new_tokens: int
    prefill_ms: float
    unpruned_prefill_ms: float
    prefill_ratio: float  # pruned / unpruned prefill wall time
    kv_bytes: int
    unpruned_kv_bytes: int
    kv_fraction: float
    samples: int
    timed_batch: int
    repeats: int
    keep_count: list = field(default_factory=list)
    visual_tokens_per_layer: list = field(default_factory=list)
    visual_token_fraction: float | None = None  # the visual tokens' own FLOPs, pruned / unpruned
    unpruned_flops: float | None = None  # mean unpruned language-model prefill FLOPs per sample
    vision_flops: float | None = None  # mean vision encoder + projector FLOPs per sample (None: unknown family)
    vision_share: float | None = None  # vision_flops / (vision_flops + unpruned_flops)
    end_to_end_fraction: float | None = None  # (vision + pruned prefill) / (vision + unpruned prefill)
    accuracy: dict | None = None  # exact match with the recipe (accuracy_report); None: the data has no answers
    unpruned_accuracy: dict | None = None  # the same for the unpruned model


def kv_bytes(cache: Any) -> int:
    """Bytes held by a transformers cache: every tensor its layers hold (keys and values; the
    convolution and recurrent states of a linear-attention layer, as Qwen3.5 has)."""
    return int(sum(value.nbytes for layer in cache.layers for value in vars(layer).values() if isinstance(value, torch.Tensor)))


def _alternate(baseline: Callable, candidate: Callable, setup: Callable, teardown: Callable, repeats: int, device: str) -> tuple[list, list]:
    """Wall times (ms) of baseline and candidate run alternately, after one warm-up of each."""
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)

    def once(fn) -> float:
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return (time.perf_counter() - start) * 1000

    baseline()
    setup(); candidate(); teardown()  # noqa: E702
    a, b = [], []
    for _ in range(repeats):
        a.append(once(baseline))
        setup()
        try:
            b.append(once(candidate))
        finally:
            teardown()
    return a, b


def _greedy(model: torch.nn.Module, inputs: dict, new_tokens: int) -> torch.Tensor:
    """(B, new_tokens) greedy continuation, padded with -1 where generation stopped early."""
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, num_beams=1)
    sequences = out.sequences if hasattr(out, "sequences") else out
    tokens = sequences[:, inputs["input_ids"].shape[1]:].cpu()
    if tokens.shape[1] < new_tokens:
        tokens = torch.cat([tokens, torch.full((tokens.shape[0], new_tokens - tokens.shape[1]), -1, dtype=tokens.dtype)], dim=1)
    return tokens


def evaluate_recipes(
    model: torch.nn.Module,
    processor: Any,
    samples: CalibrationSet,
    recipes: dict[str, Recipe],
    *,
    format_prompt: Callable[[str], str] = lambda p: p,
    new_tokens: int = 8,
    batch_size: int = 4,
    repeats: int = 5,
    device: str = "cpu",
) -> list[Evaluation]:
    """Measure every recipe against the unpruned model on ``samples``.

    The unpruned greedy continuations, logits (inside :func:`verify_recipe`) and timings are
    recomputed per recipe; timings alternate unpruned and pruned prefills of the first batch
    (``use_cache=True``, ``logits_to_keep=1``) so machine drift hits both alike.

    Returns:
        One :class:`Evaluation` per recipe, in the order given.
    """
    from runtime.families import family_for

    from .families import lm_shape
    from .flops import LMShape

    for recipe in recipes.values():
        recipe.check_model(model)  # RecipeMismatchError before any model time
    check_inputs(model, processor, samples, format_prompt=format_prompt)  # CalibrationDataError before any forward
    shape = lm_shape(model)
    batches = [model_inputs(model, processor, batch, format_prompt) for _, batch in batches_of(samples.samples, batch_size)]
    unpruned_greedy = [_greedy(model, inputs, new_tokens) for inputs in batches]
    timed = batches[0]
    answered = all(sample.answer is not None for sample in samples.samples)
    qtypes = [sample.qtype for sample in samples.samples]
    tokenizer = getattr(processor, "tokenizer", processor)

    def accuracy(greedy: list) -> dict | None:
        if not answered:
            return None
        from .accuracy import accuracy_report, exact_match

        rows = [row[row >= 0] for tokens in greedy for row in tokens]
        texts = [tokenizer.decode(row.tolist(), skip_special_tokens=True) for row in rows]
        return accuracy_report([exact_match(t, s.answer) for t, s in zip(texts, samples.samples)], qtypes)

    unpruned_accuracy = accuracy(unpruned_greedy)

    def prefill():
        with torch.no_grad():
            return model(**timed, use_cache=True, logits_to_keep=1)

    unpruned_kv = kv_bytes(prefill().past_key_values)
    results = []
    for name, recipe in recipes.items():
        v = verify_recipe(model, processor, samples, recipe, shape, format_prompt=format_prompt, batch_size=batch_size)
        match, exact, pruned_greedy = [], [], []
        with recipe.apply(model):
            for inputs, reference in zip(batches, unpruned_greedy):
                pruned_greedy.append(_greedy(model, inputs, new_tokens))
                same = pruned_greedy[-1] == reference
                match.append(same.float().mean(dim=1).numpy())
                exact.append(same.all(dim=1).numpy())
            pruned_kv = kv_bytes(prefill().past_key_values)
        handles = []
        base, pruned = _alternate(prefill, prefill, lambda: handles.append(recipe.apply(model)), lambda: handles.pop().remove(), repeats, device)
        base_ms, pruned_ms = _stats.median(base), _stats.median(pruned)
        results.append(Evaluation(
            name=name,
            flops_fraction=v.flops_fraction,
            mean_visual_tokens=float(np.mean(v.visual_tokens_per_layer)),
            kl=v.kl,
            top1_agreement=v.top1_agreement,
            greedy_match=float(np.mean(np.concatenate(match))),
            greedy_exact=float(np.mean(np.concatenate(exact))),
            new_tokens=new_tokens,
            prefill_ms=pruned_ms,
            unpruned_prefill_ms=base_ms,
            prefill_ratio=pruned_ms / base_ms,
            kv_bytes=pruned_kv,
            unpruned_kv_bytes=unpruned_kv,
            kv_fraction=pruned_kv / unpruned_kv,
            samples=v.samples,
            timed_batch=int(timed["input_ids"].shape[0]),
            repeats=repeats,
            keep_count=recipe.keep_count.tolist(),
            visual_tokens_per_layer=[round(float(x), 4) for x in v.visual_tokens_per_layer],
            visual_token_fraction=v.visual_token_fraction,
            unpruned_flops=v.unpruned_flops,
            vision_flops=v.vision_flops,
            vision_share=v.vision_share,
            end_to_end_fraction=v.end_to_end_fraction,
            accuracy=accuracy(pruned_greedy),
            unpruned_accuracy=unpruned_accuracy,
        ))
    return results


def format_table(results: Sequence[Evaluation]) -> str:
    """The comparison table ``recipe-eval`` prints."""
    header = (f"{'recipe':<24} {'flops':>7} {'vis.tok':>8} {'KL':>10} {'top1':>6} {'greedy':>7} {'exact':>6} {'prefill ms':>11} "
              f"{'ratio':>6} {'KV MiB':>8} {'KV frac':>8} {'vis.only':>8} {'e2e':>7}")
    lines = [header, "-" * len(header)]
    number = lambda value, width: f"{'-':>{width}}" if value is None else f"{value:>{width}.4f}"  # noqa: E731
    for r in results:
        lines.append(
            f"{r.name[:24]:<24} {r.flops_fraction:>7.4f} {r.mean_visual_tokens:>8.1f} {r.kl:>10.4g} {r.top1_agreement:>6.3f} "
            f"{r.greedy_match:>7.3f} {r.greedy_exact:>6.3f} {r.prefill_ms:>5.1f}/{r.unpruned_prefill_ms:<5.1f} {r.prefill_ratio:>6.3f} "
            f"{r.kv_bytes / 2**20:>8.2f} {r.kv_fraction:>8.4f} {number(r.visual_token_fraction, 8)} {number(r.end_to_end_fraction, 7)}"
        )
    if results and results[0].accuracy is not None:
        lines += ["", format_accuracy(results)]
    if results:
        from .flops import format_flops

        r = results[0]
        lines.append(
            f"{r.samples} held-out samples; greedy over {r.new_tokens} tokens; prefill = pruned/unpruned median ms over "
            f"{r.repeats} alternating runs (batch {r.timed_batch}); ratio = pruned / unpruned"
        )
        if r.vision_flops is not None and r.unpruned_flops is not None:
            lines.append(
                f"flops = language-model prefill fraction; vis.only = the visual tokens' own FLOPs fraction; e2e = with the "
                f"vision encoder + projector ({format_flops(r.vision_flops)} per sample, {100 * r.vision_share:.1f}% of the "
                f"unpruned {format_flops(r.vision_flops + r.unpruned_flops)})"
            )
    return "\n".join(lines)


def format_accuracy(results: Sequence[Evaluation]) -> str:
    """Exact-match accuracy per recipe (and the unpruned model), overall and per question type,
    with n and the 95 % Wilson interval: the part of the table ``recipe-eval`` prints when the data has answers."""
    rows = [("unpruned", 1.0, results[0].unpruned_accuracy)] + [(r.name, r.flops_fraction, r.accuracy) for r in results]
    types = sorted(results[0].unpruned_accuracy["per_type"])
    cell = lambda a: f"{100 * a['accuracy']:5.1f} [{100 * a['ci95'][0]:4.1f},{100 * a['ci95'][1]:5.1f}]"  # noqa: E731
    header = f"{'accuracy':<24} {'flops':>7} {'exact match % [95% CI]':>23}" + "".join(f" {t[:10]:>10}" for t in types)
    lines = [header, "-" * len(header)]
    for name, flops, acc in rows:
        per = acc["per_type"]
        lines.append(f"{name[:24]:<24} {flops:>7.4f} {cell(acc):>23}"
                     + "".join(f" {100 * per[t]['accuracy']:>10.1f}" if t in per else f" {'-':>10}" for t in types))
    a = results[0].unpruned_accuracy
    counts = ", ".join(f"{t} {a['per_type'][t]['n']}" for t in types)
    lines.append(f"{a['n']} questions with answers" + (f" ({counts})" if counts else "")
                 + "; exact match of the greedy continuation's first words; per-type columns in %")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ CLI
def _layers(text: str) -> list[int]:
    try:
        layers = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"layers must be comma-separated integers such as 2,8,16, got {text!r}") from None
    if not layers or min(layers) < 0:
        raise ValueError(f"layers must be non-negative integers such as 2,8,16, got {text!r}")
    return layers


def _comparable() -> list[str]:
    from .compare import known_names

    return known_names()


def eval_command():
    """The ``recipe-eval`` click command (also ``recipe-compiler eval``)."""
    import click

    from .cli_click import _attn, _dtype_key, _dtype_names, _model_type
    from .cli_click import GENERAL, GroupedCommand, Opt, Parsed, RegistryChoice, comma_completer, version

    RECIPES, COMPARE, DATA, MODEL, OUT = "Recipes to compare", "--compare: compile and compare methods", "Held-out data", "Model", "Output"

    @click.command("eval", cls=GroupedCommand, short_help="Compare recipes against the unpruned model.", groups=[RECIPES, COMPARE, DATA, MODEL, OUT, GENERAL],
                   help="Compare pruning recipes against the unpruned model on held-out samples.",
                   examples=[("two recipes against the unpruned model on the shipped held-out split",
                              "recipe-eval --recipe r45.safetensors --recipe fitprune:40"),
                             ("compile FastV, VisionZip and our search at two budgets, then the table and a plot",
                              "recipe-eval --compare fastv,visionzip,optimal --budget 0.45,0.25 --out cmp/"),
                             ("which tokens survive, drawn on an image",
                              "recipe-eval --recipe r45.safetensors --show cat.png --out pics/")])
    @click.option("--recipe", cls=Opt, group=RECIPES, multiple=True, type=click.Path(),
                  help="recipe file, or a preset fitprune:RATIO[@published_recipes.json] (llava-1.5-7b); repeat to compare")
    @click.option("--compare", cls=Opt, group=COMPARE, metavar="M1,M2", type=Parsed(str, "methods", comma_completer(_comparable)),
                  help="methods to compile and compare, comma-separated (pre-LLM stages, searches, or comparison names: optimal, fitprune, gprune, fopru); needs --budget")
    @click.option("--budget", cls=Opt, group=COMPARE, metavar="B1,B2", help="--compare: FLOPs budgets, comma-separated (e.g. 0.45,0.25)")
    @click.option("--calibration", cls=Opt, group=COMPARE, type=click.Path(),
                  help="--compare: calibration folder or .jsonl the recipes are compiled on (default: the shipped set's calibration split)")
    @click.option("--calibration-samples", cls=Opt, group=COMPARE, type=click.IntRange(min=1), help="--compare: use the first N calibration samples")
    @click.option("--data", cls=Opt, group=DATA, type=click.Path(), help="folder of images or .jsonl manifest (default: the shipped calibration set's held-out split)")
    @click.option("--samples", cls=Opt, group=DATA, type=click.IntRange(min=1), help="use the first N samples")
    @click.option("--new-tokens", cls=Opt, group=DATA, type=click.IntRange(min=1), default=8, show_default=True, help="greedy continuation length compared")
    @click.option("--repeats", cls=Opt, group=DATA, type=click.IntRange(min=1), help="alternating timed prefills per recipe (default: 5; 3 with --compare)")
    @click.option("--batch-size", cls=Opt, group=DATA, type=click.IntRange(min=1), default=4, show_default=True, help="samples per forward")
    @click.option("--model", cls=Opt, group=MODEL, type=_model_type(), default="tiny-llava", show_default=True, help="registry alias, hub id or local directory")
    @click.option("--random-weights", cls=Opt, group=MODEL, is_flag=True, help="the model's architecture with random weights")
    @click.option("--seed", cls=Opt, group=MODEL, type=int, default=0, show_default=True, help="seed for random weights")
    @click.option("--device", cls=Opt, group=MODEL, default="cpu", show_default=True, metavar="DEVICE", help="torch device")
    @click.option("--dtype", cls=Opt, group=MODEL, type=RegistryChoice(_dtype_names, metavar="DTYPE", normalize=_dtype_key),
                  default="float32", show_default=True, help="weights and activations dtype")
    @click.option("--attn-implementation", cls=Opt, group=MODEL, type=RegistryChoice(_attn, metavar="KERNEL"), default="sdpa", show_default=True,
                  help="attention kernel")
    @click.option("--json", "json_output", cls=Opt, group=OUT, is_flag=True, help="print JSON instead of the table")
    @click.option("--show", cls=Opt, group=OUT, type=click.Path(dir_okay=False),
                  help="an image: draw which visual tokens survive at --layers (LLaVA-1.5, LLaVA-NeXT, Qwen2-VL; needs matplotlib)")
    @click.option("--layers", cls=Opt, group=OUT, type=Parsed(_layers, "layers"), metavar="L1,L2",
                  help="layers to draw for --show (default: 2,8,16 clipped to the model)")
    @click.option("--out", cls=Opt, group=OUT, type=click.Path(), help="directory for the pictures (schedule.png, tokens-<recipe>.png); needs matplotlib")
    @click.version_option(version(), "--version", cls=Opt, message="%(prog)s %(version)s")
    def command(**options) -> int:
        options["recipe"] = list(options["recipe"]) or None
        options["json"] = options.pop("json_output")
        args = argparse.Namespace(**options)
        try:
            return _main(args)
        except (CompileError, RecipeError, ValueError) as exc:
            print(f"recipe-eval: error: {one_line(exc)}", file=sys.stderr)
            return EXIT_FAILURE

    return command


def _recipe_name(spec: str, taken: set) -> str:
    name = spec if spec.startswith("fitprune:") else Path(spec).stem
    base, n = name, 2
    while name in taken:
        name, n = f"{base}#{n}", n + 1
    taken.add(name)
    return name


def _picture_name(recipe_name: str) -> str:
    return "tokens-" + "".join(c if c.isalnum() or c in "-_." else "_" for c in recipe_name) + ".png"


def main(argv: Sequence[str] | None = None) -> int:
    """``recipe-eval``: see ``recipe-eval --help``. Returns the exit code (a usage error raises ``SystemExit(2)``)."""
    from .cli_click import run
    from .cli_common import EXIT_INTERRUPTED

    try:
        return run(eval_command(), argv, "recipe-eval")
    except KeyboardInterrupt:
        print("recipe-eval: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _main(args: argparse.Namespace) -> int:
    from runtime.presets import resolve

    if args.compare is not None or args.budget is not None:
        return _compare(args)
    if not args.recipe:
        raise CompileError("give --recipe (repeat to compare recipes) or --compare METHODS --budget B1,B2")
    if args.calibration or args.calibration_samples:
        raise CompileError("--calibration and --calibration-samples go with --compare")
    args.repeats = args.repeats or 5

    from .calibration import load_calibration
    from .collect import check_prompts
    from .models import parse_dtype, prepare_model

    # Everything a user can get wrong is checked before the model is loaded.
    taken: set = set()
    recipes = {_recipe_name(spec, taken): resolve(spec) for spec in args.recipe}
    samples = load_calibration(args.data, samples=args.samples, split=None if args.data else "heldout")
    dtype = parse_dtype(args.dtype)
    check_device(args.device)
    plots = args.show or args.out
    if plots:
        if not (args.show and args.out):
            raise CompileError("--show IMAGE and --out DIR go together")
        from . import plots as _plots  # noqa: F401 - fails with one line when matplotlib is missing

        _plots.require_matplotlib()
        if not Path(args.show).is_file():
            raise CompileError(f"image {args.show} does not exist")
        out_dir = Path(args.out)
        if out_dir.exists() and not out_dir.is_dir():
            raise CompileError(f"--out {out_dir} exists and is not a directory")
        for name in ["schedule.png"] + [_picture_name(n) for n in recipes]:  # a FIFO or device there would block or be replaced
            check_output_file(out_dir / name, "picture")

    # The processor and config first: prompts it refuses or that overflow the positions are
    # refused before any weight is read or built.
    plan = prepare_model(args.model, random_weights=args.random_weights)
    check_prompts(plan.processor, samples, format_prompt=plan.format_prompt, max_positions=plan.max_positions)
    loaded = plan.load(device=args.device, dtype=dtype, attn_implementation=args.attn_implementation, seed=args.seed)
    results = evaluate_recipes(
        loaded.model, loaded.processor, samples, recipes, format_prompt=loaded.format_prompt,
        new_tokens=args.new_tokens, batch_size=args.batch_size, repeats=args.repeats, device=args.device,
    )
    written = []
    if plots:
        from .plots import plot_kept_tokens, plot_schedules

        out_dir.mkdir(parents=True, exist_ok=True)
        layers = args.layers or [l for l in (2, 8, 16) if l < loaded.model.config.text_config.num_hidden_layers]
        written.append(plot_schedules(recipes, out_dir / "schedule.png"))
        for name, recipe in recipes.items():
            written.append(plot_kept_tokens(loaded, recipe, args.show, layers, out_dir / _picture_name(name), title=name))
    if args.json:
        print(json.dumps({"model": args.model, "results": [asdict(r) for r in results], "pictures": [str(p) for p in written]},
                         indent=2, sort_keys=True))
    else:
        print(format_table(results))
        for path in written:
            print(f"wrote {path}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    """``--compare``: compile each method at each budget, then the table (and the plot with --out)."""
    from .calibration import load_calibration
    from .collect import check_prompts
    from .compare import format_comparison, parse_budgets, parse_methods, plot_comparison, run_comparison
    from .models import parse_dtype, prepare_model

    if args.compare is None or args.budget is None:
        raise CompileError("--compare METHODS and --budget B1,B2 go together")
    if args.recipe:
        raise CompileError("--compare compiles its own recipes; drop --recipe (or compare recipe files without --compare)")
    if args.show:
        raise CompileError("--show draws given recipes; use it without --compare")
    methods, budgets = parse_methods(args.compare), parse_budgets(args.budget)
    calibration = load_calibration(args.calibration, samples=args.calibration_samples)
    heldout = load_calibration(args.data, samples=args.samples, split=None if args.data else "heldout")
    dtype = parse_dtype(args.dtype)
    check_device(args.device)
    out_dir = Path(args.out) if args.out else None
    if out_dir is not None:
        from . import plots as _plots

        _plots.require_matplotlib()
        if out_dir.exists() and not out_dir.is_dir():
            raise CompileError(f"--out {out_dir} exists and is not a directory")
        for name in ("compare.png", "compare.json"):
            check_output_file(out_dir / name, "output")
    plan = prepare_model(args.model, random_weights=args.random_weights)
    for samples in (calibration, heldout):
        check_prompts(plan.processor, samples, format_prompt=plan.format_prompt, max_positions=plan.max_positions)
    loaded = plan.load(device=args.device, dtype=dtype, attn_implementation=args.attn_implementation, seed=args.seed)
    say = (lambda line: None) if args.json else (lambda line: print(line, file=sys.stderr, flush=True))
    started = time.perf_counter()
    rows = run_comparison(loaded.model, loaded.processor, calibration, heldout, methods, budgets,
                          format_prompt=loaded.format_prompt, batch_size=args.batch_size, new_tokens=args.new_tokens,
                          repeats=args.repeats or 3, device=args.device, say=say, measure=evaluate_recipes)
    seconds = time.perf_counter() - started
    payload = {"model": args.model, "methods": methods, "budgets": budgets, "calibration_samples": len(calibration.samples),
               "heldout_samples": len(heldout.samples), "seconds": round(seconds, 1), "rows": [row.as_dict() for row in rows]}
    written = []
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "compare.json").write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
        written.append(out_dir / "compare.json")
        if any(row.evaluation is not None for row in rows):
            written.append(plot_comparison(rows, out_dir / "compare.png"))
    if args.json:
        print(json.dumps(payload, indent=2, sort_keys=True))
    else:
        print(format_comparison(rows))
        print(f"compiled and measured in {seconds:.0f}s")
        for path in written:
            print(f"wrote {path}")
    return 0 if any(row.evaluation is not None for row in rows) else EXIT_FAILURE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

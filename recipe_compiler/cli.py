"""Command-line entry points: ``recipe-compile``, ``recipe-inspect`` and ``recipe-eval``.

The commands are click commands (:mod:`recipe_compiler.cli_click`), also grouped as
``recipe-compiler compile|inspect|eval`` and ``python -m recipe_compiler``. The CLI only parses
options, calls the Python API and prints. A usage error (unknown option, a value outside its type or
range) is one line and exit code 2; an input found bad while checking (a file, the model) is one
line and exit code 1. Every user error is one line on
stderr and a non-zero exit; inputs are validated before any model time is spent, and the recipe
is written atomically, so a failed run leaves no file behind. Ctrl-C anywhere, the start-up's
heavy imports included, is one line and exit code 130: this module imports only the standard
library at the top, and each entry point imports the rest (click, and the registries its choices
are read from) inside its interrupt guard.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from .cli_click import _attn, _dtype_key, _dtype_names, _model_aliases, _model_type
from .cli_common import (
    EXIT_FAILURE, check_device, check_output_file, interruptible, one_line, same_file,
)

def _search_param(text: str) -> tuple:
    """``--search-param NAME=VALUE``: the value as an int, a float, or the string."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip() or not value.strip():
        raise ValueError(f"a search parameter is NAME=VALUE (e.g. layer=3), got {text!r}")
    for kind in (int, float):
        try:
            return name.strip(), kind(value)
        except ValueError:
            pass
    return name.strip(), value.strip()


def _searches():
    from .search import SEARCHES

    return SEARCHES.names()


def _scorers():
    from runtime.methods.scorers import SCORERS

    return SCORERS.names()


def _objectives():
    from .compile import OBJECTIVES

    return list(OBJECTIVES)


def _head_reductions():
    from runtime.methods.heads import HEAD_REDUCTIONS

    return HEAD_REDUCTIONS.names()


def _detectors():
    from runtime.methods.detectors import DETECTORS

    return DETECTORS.names()


def _stages():
    from .prellm_search import pre_llm_choices

    return pre_llm_choices()


def _compile_command():
    import click

    from .cli_click import Budget, GroupedCommand, Opt, Parsed, RegistryChoice, version

    MODEL, CAL, SEARCH, PRE, RUN, OUT = "Model", "Calibration", "Search", "Pre-LLM stage", "Execution", "Output"

    @click.command("compile", cls=GroupedCommand, short_help="Compile a pruning recipe under a FLOPs budget.", groups=[GENERAL_GROUP, MODEL, CAL, SEARCH, PRE, RUN, OUT],
                   help="Compile a visual-token pruning recipe for a vision-language model under a FLOPs budget.",
                   examples=[("the README quick start: a recipe for the built-in tiny model at 45% of the prefill FLOPs",
                              "recipe-compile --model tiny-llava --budget 0.45 -o r.safetensors"),
                             ("FastV at layer 3, the summary as one JSON object",
                              "recipe-compile --budget 0.3 --search fastv --search-param layer=3 -o fastv.safetensors --json"),
                             ("compare every pre-LLM stage, then search in-LLM",
                              "recipe-compile --model llava-1.5-7b --budget 0.25 --pre-llm auto --device cuda -o r.safetensors")])
    @click.option("--budget", cls=Opt, group=GENERAL_GROUP, type=Budget(), required=True, metavar="FRACTION",
                  help="fraction of the unpruned language-model prefill FLOPs to spend, in (0, 1]")
    @click.option("-o", "--output", cls=Opt, group=GENERAL_GROUP, type=click.Path(dir_okay=False), required=True,
                  help="recipe file to write (.safetensors)")
    @click.option("--model", cls=Opt, group=MODEL, type=_model_type(), default="tiny-llava", show_default=True,
                  help="registry alias (e.g. llava-1.5-7b), hub id or local directory")
    @click.option("--random-weights", cls=Opt, group=MODEL, is_flag=True, help="build the model's architecture with random weights (no download)")
    @click.option("--seed", cls=Opt, group=MODEL, type=int, default=0, show_default=True, help="seed for random weights")
    @click.option("--dtype", cls=Opt, group=MODEL, type=RegistryChoice(_dtype_names, metavar="DTYPE", normalize=_dtype_key),
                  default="float32", show_default=True, help="weights and activations dtype")
    @click.option("--attn-implementation", cls=Opt, group=MODEL, type=RegistryChoice(_attn, metavar="KERNEL"), default="sdpa",
                  show_default=True, help="attention kernel")
    @click.option("--calibration", cls=Opt, group=CAL, type=click.Path(), help="folder of images (optionally with manifest.jsonl) or a .jsonl manifest (default: the shipped set)")
    @click.option("--samples", cls=Opt, group=CAL, type=click.IntRange(min=1), help="use the first N calibration samples")
    @click.option("--batch-size", cls=Opt, group=CAL, type=click.IntRange(min=1), default=4, show_default=True, help="calibration samples per forward")
    @click.option("--stats", cls=Opt, group=CAL, type=click.Path(dir_okay=False), help="reuse statistics saved with --save-stats instead of calibrating")
    @click.option("--search", cls=Opt, group=SEARCH, type=RegistryChoice(_searches, metavar="SEARCH"), default="optimal", show_default=True,
                  help="schedule search")
    @click.option("--scorer", cls=Opt, group=SEARCH, type=RegistryChoice(_scorers, metavar="SCORER"),
                  help="run-time scorer recorded in the recipe (default: fitprune; a peer search uses its own)")
    @click.option("--head-reduce", cls=Opt, group=SEARCH, type=RegistryChoice(_head_reductions, metavar="REDUCTION"),
                  help="how attention heads are combined (default: the scorer's own)")
    @click.option("--objective", cls=Opt, group=SEARCH, type=RegistryChoice(_objectives, metavar="OBJECTIVE"), default="text+visual", show_default=True,
                  help="attention whose lost mass the search minimises: text+visual (FitPrune's) or text (text queries only; "
                       "calibration then computes no visual query row; needs --scorer text-mean or last-token)")
    @click.option("--search-param", cls=Opt, group=SEARCH, multiple=True, type=Parsed(_search_param, "NAME=VALUE"), metavar="NAME=VALUE",
                  help="a peer method's setting, repeatable (e.g. --search fastv --search-param layer=3)")
    @click.option("--pre-llm", cls=Opt, group=PRE, type=RegistryChoice(_stages, metavar="STAGE"),
                  help="pre-LLM stage (drops tokens before the language model); auto compares them all, none included "
                       "(default: auto with a table search, none with a model-in-the-loop or peer search; "
                       "named explicitly, auto also prints its candidate table)")
    @click.option("--pre-llm-ratio", cls=Opt, group=PRE, type=click.FloatRange(0, 1, min_open=True),
                  help="keep ratio of a fixed-ratio pre-LLM stage in (0, 1] (default: the best of a grid)")
    @click.option("--gprune-threshold", cls=Opt, group=PRE, type=click.FloatRange(-1, 1), help="G-Prune similarity threshold in [-1, 1] (default: 0.5)")
    @click.option("--gprune-temperature", cls=Opt, group=PRE, type=click.FloatRange(0, min_open=True), help="G-Prune softmax temperature > 0 (default: 0.03)")
    @click.option("--gprune-steps", cls=Opt, group=PRE, type=click.IntRange(min=0), help="G-Prune propagation steps >= 0 (default: 5)")
    @click.option("--fopru-feature-layer", cls=Opt, group=PRE, type=int,
                  help="vision-encoder layer whose attention FoPru reads, HF vision_feature_layer convention, negative allowed (default: the model's feature layer)")
    @click.option("--inflection-detector", cls=Opt, group=PRE, type=RegistryChoice(_detectors, metavar="DETECTOR"),
                  help="knee detector of cls-inflection: kneedle (farthest from the chord) or max-curvature (default: kneedle)")
    @click.option("--device", cls=Opt, group=RUN, default="cpu", show_default=True, metavar="DEVICE", help="torch device for calibration (under torchrun, cuda means cuda:LOCAL_RANK)")
    @click.option("--device-map", cls=Opt, group=RUN, type=Parsed(_device_map, "device map", lambda i: [s for s in DEVICE_MAP_STRATEGIES if s.startswith(i)]),
                  metavar="MAP", help="spread a checkpoint's layers over devices: auto, balanced, sequential or a JSON map (needs accelerate: pip install 'recipe-compiler[big]')")
    @click.option("--save-stats", cls=Opt, group=OUT, type=click.Path(dir_okay=False), help="also write the calibration statistics to this file")
    @click.option("--json", "as_json", cls=Opt, group=OUT, is_flag=True, help="print the summary as one JSON object on stdout (default: one line of text)")
    @click.option("--quiet", cls=Opt, group=OUT, is_flag=True, help="no progress bars")
    @click.version_option(version(), "--version", cls=Opt, group=GENERAL_GROUP, message="%(prog)s %(version)s")
    @click.pass_context
    def command(ctx, **options):
        options["search_param"] = list(options["search_param"])
        return _compile_entry(argparse.Namespace(**options))

    return command


GENERAL_GROUP = "General"


def _compile_entry(args: argparse.Namespace) -> int:
    from runtime.errors import RecipeError

    from .distributed import RankFailed, env_world, from_env
    from .errors import CompileError

    rank, world, _ = env_world()
    try:
        check_device(args.device)
        with from_env(args.device) as (sharding, device):  # under torchrun: join the process group
            args.device = device
            return _compile(args, sharding)
    except (CompileError, RecipeError, ValueError, RankFailed) as exc:
        if rank == 0:  # every rank fails alike (inputs are checked on all, then agreed); say it once
            print(f"recipe-compile: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_FAILURE


@interruptible("recipe-compile", "interrupted; no recipe was written")
def compile_main(argv: Sequence[str] | None = None) -> int:
    """``recipe-compile``: see ``recipe-compile --help``. Returns the exit code (a usage error raises ``SystemExit(2)``)."""
    from .cli_click import run

    return run(_compile_command(), argv, "recipe-compile")


def _compile(args: argparse.Namespace, sharding=None) -> int:
    from .calibration import load_calibration
    from .collect import check_prompts
    from .compile import CompileConfig, compile_recipe
    from .search import SEARCHES
    from .distributed import SINGLE
    from .errors import CompileError
    from .models import parse_dtype, prepare_model
    from .statistics import load_statistics, save_statistics

    sharding = sharding or SINGLE
    timings = {}
    output = Path(args.output)
    try:  # every rank checks the inputs; all then agree, so a bad input stops every rank, none hangs
        if sharding.is_main:  # only rank 0 writes
            _check_writable(output, "recipe")
            if args.save_stats:
                _check_writable(Path(args.save_stats), "statistics")
                if same_file(output, Path(args.save_stats)):
                    raise CompileError(f"-o and --save-stats name the same file ({args.output}, {args.save_stats}); "
                                       "the recipe would replace the statistics: give them different paths")
        if args.stats and same_file(output, Path(args.stats)):
            raise CompileError(f"-o names the statistics file given to --stats ({args.stats}); the recipe would replace it: "
                               "write the recipe elsewhere")
        config = CompileConfig(budget=args.budget, search=args.search, scorer=args.scorer, head_reduce=args.head_reduce, batch_size=args.batch_size,
                               pre_llm=args.pre_llm, pre_llm_ratio=args.pre_llm_ratio,
                               gprune={k: v for k, v in (("threshold", args.gprune_threshold), ("temperature", args.gprune_temperature),
                                                         ("steps", args.gprune_steps)) if v is not None} or None,
                               fopru_feature_layer=args.fopru_feature_layer, inflection_detector=args.inflection_detector,
                               search_params=dict(args.search_param) or None, objective=args.objective)
        dtype = parse_dtype(args.dtype)
        check_device(args.device)
        if args.device_map is not None and sharding.world > 1:
            raise CompileError("--device-map cannot be combined with torchrun: each rank would spread the model over every GPU; use one process")
        calibration = load_calibration(args.calibration, samples=args.samples)
        statistics = load_statistics(args.stats) if args.stats else None

        started = time.perf_counter()
        # The processor and config first: prompts it refuses or that overflow the positions are
        # refused before any weight is read or built.
        plan = prepare_model(args.model, random_weights=args.random_weights)
        check_prompts(plan.processor, calibration, format_prompt=plan.format_prompt, max_positions=plan.max_positions)
        placement = {} if args.device_map is None else {"device_map": args.device_map}
        loaded = plan.load(device=args.device, dtype=dtype, attn_implementation=args.attn_implementation, seed=args.seed, **placement)
        timings["load"] = time.perf_counter() - started
    except Exception as exc:  # noqa: BLE001 - re-raised by agree() on this rank
        sharding.agree(exc)
        raise
    sharding.agree(None)

    result = compile_recipe(
        loaded.model, loaded.processor, calibration, config,
        format_prompt=loaded.format_prompt, statistics=statistics,
        progress=None if args.quiet or not sharding.is_main else _progress_bars(), sharding=sharding,
    )
    if not sharding.is_main:  # rank 0 writes and reports; the statistics and recipe are the same on every rank
        return 0
    timings.update(result.timings)
    started = time.perf_counter()
    if args.save_stats:
        save_statistics(result.statistics, args.save_stats)
    result.recipe.save(output)
    timings["write"] = time.perf_counter() - started

    v = result.verification
    v_ref = result.recipe.reference_visual_tokens
    if args.as_json:  # the same figures as the text line, one JSON object, nothing else on stdout
        print(json.dumps(_summary(args, result, timings, output), sort_keys=True))
        return 0
    if args.pre_llm == "auto":  # the candidate table, then the usual summary line
        print(result.details["pre_llm_table"])
    stage = result.recipe.pre_llm
    if stage["method"] != "none":
        stage_text = f" | pre-llm {stage['method']}" + (f" {stage['keep_ratio']:g}" if "keep_ratio" in stage else "")
    else:  # said only when auto compared the stages and kept none
        stage_text = " | pre-llm none" if "pre_llm_table" in result.details else ""
    found = result.recipe.provenance.get("search_params", {})
    method = SEARCHES[args.search]
    if method.is_method:  # what the peer method chose, e.g. "fastv K=2 keep 130"
        stage_text += " | " + method.name + " " + " ".join(f"{k} {v}" for k, v in found.items() if k != "method")
    stage_times = " ".join(f"{k} {timings[k]:.1f}s" for k in ("load", "calibrate", "search", "select", "verify", "write") if k in timings)
    from .flops import format_flops

    # Not part of the budget: the vision encoder's own cost and the visual tokens' own FLOPs fraction.
    vision_text = f" | visual-only flops {v.visual_token_fraction:.4f}" + (
        "" if v.vision_flops is None else f" | vision encoder {format_flops(v.vision_flops)}/sample ({100 * v.vision_share:.1f}% of unpruned)")
    print(
        f"budget {args.budget:g} | flops {v.flops_fraction:.4f} | visual tokens {result.visual_token_equivalent:.1f}/{v_ref} "
        f"| divergence {result.divergence:.4f} (runs {result.nested_divergence:.4f}, verified {v.divergence:.4f}) | kl {v.kl:.4g} | top1 {v.top1_agreement:.2f} | search {args.search}{stage_text}"
        f"{vision_text} | time {stage_times} | wrote {output}"
    )
    return 0


def _summary(args: argparse.Namespace, result, timings: dict, output: Path) -> dict:
    """``recipe-compile --json``: what the summary line says, as one JSON object."""
    v = result.verification
    summary = {
        "budget": args.budget, "flops_fraction": v.flops_fraction, "visual_token_fraction": v.visual_token_fraction,
        "visual_tokens": result.visual_token_equivalent, "reference_visual_tokens": result.recipe.reference_visual_tokens,
        "divergence": result.divergence, "divergence_nested": result.nested_divergence, "divergence_verified": v.divergence,
        "kl": v.kl, "top1_agreement": v.top1_agreement, "search": args.search,
        "search_params": result.recipe.provenance.get("search_params", {}), "scorer": result.recipe.scorer,
        "head_reduce": result.recipe.head_reduce, "objective": args.objective, "pre_llm": result.recipe.pre_llm, "model": args.model,
        "vision_encoder_flops": v.vision_flops, "vision_share": v.vision_share if v.vision_flops is not None else None,
        "seconds": {k: round(t, 3) for k, t in timings.items()}, "output": str(output),
        "statistics": args.save_stats,
    }
    if "pre_llm_table" in result.details:  # the stages compared (--pre-llm auto, named or the default)
        summary["pre_llm_table"] = result.details["pre_llm_table"]
    return summary


def _device_map(text: str):
    """``--device-map``: a strategy name passed through to ``from_pretrained``, or a JSON object."""
    if text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"device map is not valid JSON ({exc.msg}): {text!r}") from None
        if not isinstance(value, dict) or not value:
            raise ValueError(f"device map must be a non-empty JSON object of module → device, got {text!r}")
        return value
    if text not in DEVICE_MAP_STRATEGIES:
        raise ValueError(
            f"device map must be one of {', '.join(DEVICE_MAP_STRATEGIES)} or a JSON object such as '{{\"\": \"cpu\"}}', got {text!r}"
        )
    return text


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def _check_writable(path: Path, what: str) -> None:
    from .errors import CompileError

    directory = path.parent if str(path.parent) else Path(".")
    check_output_file(path, what)
    if not directory.is_dir():
        raise CompileError(f"cannot write {what} to {path}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK):
        raise CompileError(f"cannot write {what} to {path}: directory {directory} is not writable")


def _progress_bars():
    from tqdm import tqdm

    bars = []

    def factory(stage: str, total: int):
        bar = tqdm(total=total, desc=stage, unit="sample", file=sys.stderr, leave=False, dynamic_ncols=True)
        bars.append(bar)

        def step(n: int) -> None:
            bar.update(n)
            if bar.n >= bar.total:
                bar.close()

        return step

    return factory


def _inspect_command():
    import click

    from .cli_click import GENERAL, Arg, GroupedCommand, Opt, version

    @click.command("inspect", cls=GroupedCommand, short_help="Print a recipe's schedule and provenance.", groups=[GENERAL],
                   help="Print a recipe's per-layer schedule and provenance.",
                   examples=[("the table", "recipe-inspect r.safetensors"),
                             ("FitPrune's published 40% schedule for LLaVA-1.5-7B, as JSON", "recipe-inspect fitprune:40 --json")])
    @click.argument("recipe", cls=Arg, type=click.Path(),
                    help="recipe file (.safetensors), or a preset fitprune:RATIO[@published_recipes.json] (llava-1.5-7b)")
    @click.option("--json", "as_json", cls=Opt, is_flag=True, help="print JSON instead of a table")
    @click.version_option(version(), "--version", cls=Opt, message="%(prog)s %(version)s")
    def command(recipe: str, as_json: bool) -> int:
        return _inspect(recipe, as_json)

    return command


def _inspect(spec: str, as_json: bool) -> int:
    from runtime.errors import RecipeError
    from runtime.presets import resolve

    try:
        recipe = resolve(spec)  # a file, or a FitPrune published preset
    except RecipeError as exc:
        print(f"recipe-inspect: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_FAILURE
    if as_json:
        print(json.dumps(_describe(recipe), indent=2, sort_keys=True))
    else:
        print(format_recipe(recipe))
    return 0


@interruptible("recipe-inspect", "interrupted")
def inspect_main(argv: Sequence[str] | None = None) -> int:
    """``recipe-inspect RECIPE``: print a recipe's schedule and provenance. Returns the exit code."""
    from .cli_click import run

    return run(_inspect_command(), argv, "recipe-inspect")


def _describe(recipe) -> dict:
    return {
        "keep_count": recipe.keep_count.tolist(),
        "keep_ratio": [round(float(r), 6) for r in recipe.keep_ratio],
        "scorer": recipe.scorer,
        "head_reduce": recipe.head_reduce,
        "pre_llm": recipe.pre_llm,
        "fingerprint": recipe.fingerprint,
        "provenance": recipe.provenance,
        "vision_encoder": _vision(recipe),
    }


def _vision(recipe) -> dict | None:
    """The vision encoder's FLOPs per reference image, when the fingerprint names a registry model."""
    from .families import registry_vision_flops

    try:
        found = registry_vision_flops(recipe.fingerprint)
    except Exception:  # noqa: BLE001 - optional information; inspect must still print the recipe
        return None
    return None if found is None else {"model": found[0], "flops_per_reference_image": found[1]}


def _stage_text(stage: dict) -> str:
    """The whole pre-LLM stage: method, what it keeps, every parameter, and a stage-2 layer-K cut."""
    from runtime.methods.stages import NO_STAGE, STAGES

    method = stage.get("method", NO_STAGE)
    if method == NO_STAGE:
        return NO_STAGE
    params = dict(stage.get("params", {}))
    text = f"{method}: {STAGES[method].describe(stage)}, on entry to layer 0"
    if "stage2_layer" in params:
        text += f"; stage 2: {params.pop('stage2_ratio', '?')} of the survivors from layer {params.pop('stage2_layer')}"
    if params:
        text += " (" + ", ".join(f"{key} {value}" for key, value in sorted(params.items())) + ")"
    return text


def format_recipe(recipe) -> str:
    """The human-readable table ``recipe-inspect`` prints."""
    from .flops import format_flops

    fp, prov = recipe.fingerprint, recipe.provenance
    lines = [
        f"model     {fp['model_type']}  layers {fp['num_layers']}  hidden {fp['hidden_size']}  heads {fp['num_heads']}/{fp['num_kv_heads']} kv"
        f"  visual tokens {fp['visual_tokens']}  config {fp['config_hash']}",
        f"scorer    {recipe.scorer} (heads: {recipe.head_reduce})",
        f"pre-LLM   {_stage_text(recipe.pre_llm)}",
    ]
    vision = _vision(recipe)
    if vision is not None:
        lines.append(f"vision    encoder + projector {format_flops(vision['flops_per_reference_image'])} per reference image "
                     f"({vision['model']}; not part of the budget)")
    if prov:
        measured = "  ".join(
            f"{key} {prov[key]:.4g}" for key in ("budget", "flops_fraction", "divergence", "divergence_nested", "divergence_verified", "kl", "top1_agreement") if isinstance(prov.get(key), (int, float))
        )
        lines.append(f"compiled  search {prov.get('search', '?')} {json.dumps(prov.get('search_params', {}), sort_keys=True)}")
        lines.append(f"measured  {measured}")
        calibration = prov.get("calibration", {})
        if calibration:
            lines.append(f"calib     {calibration.get('samples')} samples, fingerprint {str(calibration.get('fingerprint', ''))[:16]}")
        if prov.get("versions"):
            lines.append("versions  " + "  ".join(f"{k} {v}" for k, v in sorted(prov["versions"].items())))
    lines.append("")
    lines.append("layer  keep  ratio   pruned on entry")
    previous = None
    for layer, (count, ratio) in enumerate(zip(recipe.keep_count.tolist(), recipe.keep_ratio.tolist())):
        dropped = "" if previous is None or count == previous else f"-{previous - count}"
        lines.append(f"{layer:>5}  {count:>4}  {ratio:6.3f}  {dropped}")
        previous = count
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- eval
@interruptible("recipe-eval", "interrupted")
def eval_main(argv: Sequence[str] | None = None) -> int:
    """``recipe-eval``: see ``recipe-eval --help``. Returns the exit code (a usage error raises ``SystemExit(2)``)."""
    from .cli_click import run
    from .evaluate import eval_command

    return run(eval_command(), argv, "recipe-eval")


# ---------------------------------------------------------------------------------------- group
def group_command():
    """``recipe-compiler``: the three commands as subcommands (``compile | inspect | eval``)."""
    import click

    from .cli_click import CONTEXT, version
    from .evaluate import eval_command

    @click.group("recipe-compiler", context_settings=CONTEXT,
                 help="Compile, inspect and evaluate visual-token pruning recipes. "
                      "Each subcommand is also its own console script: recipe-compile, recipe-inspect, recipe-eval.")
    @click.version_option(version(), "--version", message="%(prog)s %(version)s")
    def group() -> None:
        pass

    for command in (_compile_command(), _inspect_command(), eval_command()):
        group.add_command(command)
    return group


@interruptible("recipe-compiler", "interrupted")
def group_main(argv: Sequence[str] | None = None, prog: str | None = "recipe-compiler") -> int:
    """``recipe-compiler compile|inspect|eval …`` (and ``python -m recipe_compiler``). Returns the exit code."""
    from .cli_click import run

    return run(group_command(), argv, prog)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(compile_main())

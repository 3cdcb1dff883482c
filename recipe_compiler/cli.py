"""Command-line entry points: ``recipe-compile``, ``recipe-inspect`` and ``recipe-eval``.

The CLI only parses options, calls the Python API and prints. Every user error is one line on
stderr and a non-zero exit; inputs are validated before any model time is spent, and the recipe
is written atomically, so a failed run leaves no file behind. Ctrl-C anywhere, the start-up's
heavy imports included, is one line and exit code 130: this module imports only the standard
library at the top, and each entry point imports the rest inside its interrupt guard.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from .cli_common import (
    EXIT_FAILURE, Parser, check_device, check_output_file, interruptible, one_line, positive_int, same_file,
)

def _budget(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"budget must be a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(
            f"budget must be in (0, 1] (the fraction of unpruned prefill FLOPs to spend), got {text}"
        )
    return value


def _search_param(text: str) -> tuple:
    """``--search-param NAME=VALUE``: the value as an int, a float, or the string."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip() or not value.strip():
        raise argparse.ArgumentTypeError(f"a search parameter is NAME=VALUE (e.g. layer=3), got {text!r}")
    for kind in (int, float):
        try:
            return name.strip(), kind(value)
        except ValueError:
            pass
    return name.strip(), value.strip()


def _compile_parser() -> argparse.ArgumentParser:
    from runtime.methods.detectors import DETECTORS
    from runtime.methods.heads import HEAD_REDUCTIONS
    from runtime.methods.scorers import SCORERS

    from .cli_common import attn_implementations
    from .prellm_search import pre_llm_choices
    from .search import SEARCHES

    parser = Parser(
        prog="recipe-compile",
        description="Compile a visual-token pruning recipe for a vision-language model under a FLOPs budget.",
    )
    parser.add_argument("--model", default="tiny-llava", help="registry alias (e.g. llava-1.5-7b), hub id or local directory (default: tiny-llava)")
    parser.add_argument("--budget", type=_budget, required=True, help="fraction of the unpruned language-model prefill FLOPs to spend, in (0, 1]")
    parser.add_argument("-o", "--output", required=True, help="recipe file to write (.safetensors)")
    parser.add_argument("--calibration", help="folder of images (optionally with manifest.jsonl) or a .jsonl manifest (default: the shipped set)")
    parser.add_argument("--samples", type=positive_int, help="use the first N calibration samples")
    parser.add_argument("--search", choices=SEARCHES.names(), default="optimal", help="schedule search (default: optimal)")
    methods = [s for s in SEARCHES.values() if s.is_method]
    own = ", ".join(f"--search {s.name}: {s.scorer}" for s in methods)
    parser.add_argument("--scorer", choices=SCORERS.names(), help=f"run-time scorer recorded in the recipe (default: fitprune; a peer search's own: {own})")
    reductions = ", ".join(f"{name}: {scorer.head_reduce}" for name, scorer in SCORERS.items())
    parser.add_argument("--head-reduce", choices=HEAD_REDUCTIONS.names(), help=f"how attention heads are combined (default: the scorer's own; {reductions})")
    settings = "; ".join(f"{s.name}: " + ", ".join(f"{name} ({p.help})" for name, p in s.params.items()) for s in methods if s.params)
    parser.add_argument("--search-param", action="append", type=_search_param, default=[], metavar="NAME=VALUE",
                        help=f"a peer method's setting, repeatable ({settings})")
    parser.add_argument("--device", default="cpu", help="torch device for calibration (default: cpu; under torchrun, cuda means cuda:LOCAL_RANK)")
    parser.add_argument("--device-map", type=_device_map, help="spread a checkpoint's layers over devices: auto, balanced, sequential or a JSON map (needs accelerate: pip install 'recipe-compiler[big]')")
    parser.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16 (default: float32)")
    parser.add_argument("--attn-implementation", choices=attn_implementations(), default="sdpa", help="attention kernel (default: sdpa)")
    parser.add_argument("--batch-size", type=positive_int, default=4, help="calibration samples per forward (default: 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed for random weights (default: 0)")
    parser.add_argument("--random-weights", action="store_true", help="build the model's architecture with random weights (no download)")
    parser.add_argument("--save-stats", help="also write the calibration statistics to this file")
    parser.add_argument("--stats", help="reuse statistics saved with --save-stats instead of calibrating")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--pre-llm", choices=pre_llm_choices(), default="none",
                        help="pre-LLM stage (drops tokens before the language model); auto compares them all and prints a candidate table (default: none)")
    parser.add_argument("--gprune-threshold", type=float, help="G-Prune similarity threshold in [-1, 1] (default: 0.5)")
    parser.add_argument("--gprune-temperature", type=float, help="G-Prune softmax temperature > 0 (default: 0.03)")
    parser.add_argument("--gprune-steps", type=int, help="G-Prune propagation steps >= 0 (default: 5)")
    parser.add_argument("--pre-llm-ratio", type=float, help="keep ratio of a fixed-ratio pre-LLM stage in (0, 1] (default: the best of a grid)")
    parser.add_argument("--fopru-feature-layer", type=int, help="vision-encoder layer whose attention FoPru reads, HF vision_feature_layer convention, negative allowed (default: the model's feature layer)")
    parser.add_argument("--inflection-detector", choices=DETECTORS.names(), help="knee detector of cls-inflection: kneedle (farthest from the chord) or max-curvature (default: kneedle)")
    return parser


@interruptible("recipe-compile", "interrupted; no recipe was written")
def compile_main(argv: Sequence[str] | None = None) -> int:
    """``recipe-compile``: see ``recipe-compile --help``. Returns the exit code."""
    parser = _compile_parser()
    args = parser.parse_args(argv)
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
                               search_params=dict(args.search_param) or None)
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
    if args.pre_llm == "auto":  # the candidate table, then the usual summary line
        print(result.details["pre_llm_table"])
    stage = result.recipe.pre_llm
    stage_text = "" if stage["method"] == "none" else f" | pre-llm {stage['method']}" + (f" {stage['keep_ratio']:g}" if "keep_ratio" in stage else "")
    found = result.recipe.provenance.get("search_params", {})
    method = SEARCHES[args.search]
    if method.is_method:  # what the peer method chose, e.g. "fastv K=2 keep 130"
        stage_text += " | " + method.name + " " + " ".join(f"{k} {v}" for k, v in found.items() if k != "method")
    stage_times = " ".join(f"{k} {timings[k]:.1f}s" for k in ("load", "calibrate", "search", "verify", "write"))
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


def _device_map(text: str):
    """``--device-map``: a strategy name passed through to ``from_pretrained``, or a JSON object."""
    if text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"device map is not valid JSON ({exc.msg}): {text!r}") from None
        if not isinstance(value, dict) or not value:
            raise argparse.ArgumentTypeError(f"device map must be a non-empty JSON object of module → device, got {text!r}")
        return value
    if text not in DEVICE_MAP_STRATEGIES:
        raise argparse.ArgumentTypeError(
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


@interruptible("recipe-inspect", "interrupted")
def inspect_main(argv: Sequence[str] | None = None) -> int:
    """``recipe-inspect RECIPE``: print a recipe's schedule and provenance. Returns the exit code."""
    parser = Parser(prog="recipe-inspect", description="Print a recipe's per-layer schedule and provenance.")
    parser.add_argument("recipe", help="recipe file (.safetensors), or a preset fitprune:RATIO[@published_recipes.json] (llava-1.5-7b)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    from runtime.errors import RecipeError
    from runtime.presets import resolve

    try:
        recipe = resolve(args.recipe)  # a file, or a FitPrune published preset
    except RecipeError as exc:
        print(f"recipe-inspect: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        print(json.dumps(_describe(recipe), indent=2, sort_keys=True))
    else:
        print(format_recipe(recipe))
    return 0


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
    """``recipe-eval``: :func:`recipe_compiler.evaluate.main` behind the interrupt guard. Returns the exit code."""
    from .evaluate import main

    return main(argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(compile_main())

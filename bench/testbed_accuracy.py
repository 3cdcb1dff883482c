"""Accuracy vs verified FLOPs of every method on the trained ``testbed-llava`` (issue 11's table).

    python bench/testbed_accuracy.py --questions 1000 --out bench/results/testbed-accuracy.json

Writes the JSON (one row per recipe: method, budget, accuracy with n and 95 % Wilson interval, per
question type, verified FLOPs fraction, KL, top-1 agreement) and a plot next to it (``.png``).
Held-out questions come from a seed never trained on; recipes are compiled on a separate
calibration seed. See :mod:`recipe_compiler.testbed.table`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--questions", type=int, default=1000)
    parser.add_argument("--heldout-seed", type=int, default=2)
    parser.add_argument("--calib-seed", type=int, default=3)
    parser.add_argument("--calib-scenes", type=int, default=4)
    parser.add_argument("--budgets", default="0.6,0.45,0.3,0.2,64-tokens",
                        help="comma-separated budgets; 64-tokens: the FLOPs of 64 visual tokens through every layer")
    parser.add_argument("--searches", default="optimal,gsearch,psigmoid,fitprune")
    parser.add_argument("--stages", default="g-prune,fopru-rank,fopru-row,random")
    parser.add_argument("--no-cls-inflection", action="store_true")
    parser.add_argument("--no-random-scorer", action="store_true")
    parser.add_argument("--no-text-objective", action="store_true")
    parser.add_argument("--no-default", action="store_true", help="skip the default compile (--pre-llm auto)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--no-reference", action="store_true", help="skip keep-all and no-image (a second shard)")
    parser.add_argument("--merge", nargs="+", help="merge shard JSON files into --out (and plot) instead of measuring")
    parser.add_argument("--out", default="bench/results/testbed-accuracy.json")
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args.merge, Path(args.out))

    import torch

    torch.set_num_threads(1)
    from recipe_compiler.calibration import load_calibration
    from recipe_compiler.models import load_model
    from recipe_compiler.testbed.make import write_dataset
    from recipe_compiler.testbed.table import (
        DEFAULT, TEXT_OBJECTIVE, build_entries, measure, measure_without_image, plot_table, prepare_batches, unpruned_reference,
    )

    t_all = time.perf_counter()
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    work = Path(tempfile.mkdtemp(prefix="testbed-table-"))
    n_scenes = args.questions // 8 + 10
    write_dataset(args.heldout_seed, n_scenes, work / "heldout", questions=args.questions)
    write_dataset(args.calib_seed, args.calib_scenes, work / "calib", split="calib")
    heldout = load_calibration(str(work / "heldout"), split=None)
    calib = load_calibration(str(work / "calib"))
    loaded = load_model("testbed-llava")
    log(f"{loaded.source}; {len(heldout)} held-out questions (seed {args.heldout_seed}), {len(calib)} calibration (seed {args.calib_seed})")
    budgets = [float(b) if b != "64-tokens" else sixty_four_token_budget(loaded, calib) for b in args.budgets.split(",") if b]
    entries = build_entries(loaded, calib, budgets, log=log, searches=[s for s in args.searches.split(",") if s],
                            stages=[s for s in args.stages.split(",") if s], cls_inflection=not args.no_cls_inflection,
                            random_scorer=not args.no_random_scorer, text_objective=not args.no_text_objective,
                            default=not args.no_default)
    batches = prepare_batches(loaded, heldout.samples, args.batch_size)
    t0 = time.perf_counter()
    refs = unpruned_reference(loaded.model, batches)
    log(f"unpruned reference: {time.perf_counter() - t0:.1f}s")
    rows = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table = {"model": "testbed-llava", "source": loaded.source, "heldout_seed": args.heldout_seed, "calib_seed": args.calib_seed,
             "calibration_samples": len(calib), "questions": len(heldout), "budgets": budgets, "rows": rows,
             "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores shared with other sessions, torch 1 thread",
             "torch": torch.__version__}
    if not args.no_reference:
        t0 = time.perf_counter()
        m = measure_without_image(loaded, heldout.samples, args.batch_size)
        rows.append({"method": "no image", "budget": None, **m, "eval_s": round(time.perf_counter() - t0, 1)})
        log(f"        no image: acc {100 * m['accuracy']:.1f}% ({rows[-1]['eval_s']}s)")
    else:
        entries = [e for e in entries if e.budget is not None]
    # The lines that matter most first, so an interrupted run still has them at every budget.
    priority = ["keep-all", DEFAULT, "optimal", "random", "fitprune", "random (in-LLM)", TEXT_OBJECTIVE, "gsearch", "psigmoid", "g-prune",
                "fopru-rank", "fopru-row", "cls-inflection", "divprune", "visionzip", "vtc-cls", "prumerge-plus"]
    entries.sort(key=lambda e: priority.index(e.method) if e.method in priority else len(priority))
    for entry in entries:
        t0 = time.perf_counter()
        m = measure(loaded.model, batches, refs, entry.recipe)
        row = {"method": entry.method, "budget": entry.budget, **m, "keep_count": entry.recipe.keep_count.tolist(),
               "pre_llm": entry.recipe.pre_llm or None, "compile_s": round(entry.compile_s, 1),
               "eval_s": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        log(f"{entry.method:>16} @ {entry.budget}: acc {100 * m['accuracy']:.1f}% [{100 * m['ci95'][0]:.1f}, {100 * m['ci95'][1]:.1f}] "
            f"flops {m['flops_fraction']:.4f} kl {m['kl']:.3g} top1 {m['top1_agreement']:.3f} ({row['eval_s']}s)")
        table["wall_s"] = round(time.perf_counter() - t_all, 1)
        out.write_text(json.dumps(table, indent=1, sort_keys=False) + "\n")  # partial results survive an interruption
    plot_table(table, out.with_suffix(".png"))
    log(f"wrote {out} and {out.with_suffix('.png')} in {time.perf_counter() - t_all:.0f}s")
    return 0


def sixty_four_token_budget(loaded, calibration) -> float:
    """The FLOPs fraction of keeping 64 visual tokens through every layer on ``calibration`` (the
    "64 tokens" point of the papers), rounded down to 4 decimals so a 64-token stage meets it."""
    import numpy as np

    from recipe_compiler.collect import model_inputs
    from recipe_compiler.families import lm_shape
    from recipe_compiler.flops import layer_flops

    shape = lm_shape(loaded.model)
    inputs = model_inputs(loaded.model, loaded.processor, calibration.samples, loaded.format_prompt)
    visual = (inputs["input_ids"] == loaded.model.config.image_token_id).sum(1).numpy()
    other = inputs["attention_mask"].sum(1).numpy() - visual
    fraction = float(np.mean(layer_flops(shape, other + 64)) / np.mean(layer_flops(shape, other + visual)))
    return math.floor(fraction * 1e4) / 1e4


def merge(paths, out: Path) -> int:
    """One table from shards run on the same model and data (rows concatenated, keep-all first)."""
    from recipe_compiler.testbed.table import plot_table

    shards = [json.loads(Path(p).read_text()) for p in paths]
    table = dict(shards[0])
    for key in ("source", "heldout_seed", "calib_seed", "questions"):
        if any(s[key] != table[key] for s in shards):
            raise SystemExit(f"shards differ in {key}; run them on the same model and data")
    table["budgets"] = sorted({b for s in shards for b in s["budgets"]}, reverse=True)
    rows = [r for s in shards for r in s["rows"]]
    table["rows"] = sorted(rows, key=lambda r: (r["budget"] is not None, -(r["budget"] or 0)))
    # A shard may itself be a merged table (a later shard adds lines to it): keep one wall time per measured shard.
    table["wall_s"] = [w for s in shards for w in (s["wall_s"] if isinstance(s.get("wall_s"), list) else [s.get("wall_s")])]
    table["shards"] = len(table["wall_s"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(table, indent=1) + "\n")
    plot_table(table, out.with_suffix(".png"))
    print(f"wrote {out} ({len(rows)} rows) and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Compile time per stage, and calibration overhead vs a plain SDPA forward.

Stages: load the model, read and validate the calibration set, calibrate (statistics), search
(``optimal`` and ``fitprune``), verify, write. The calibration overhead compares the statistics
pass with plain forwards of the same batches.

    python bench/compile.py                     # tiny-llava on the shipped calibration set
    python bench/compile.py --model mid --samples 8 --out bench/results/compile-mid-cpu.json

Prints JSON; ``--out`` also writes it.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from common import emit, machine, spec_for

from recipe_compiler.calibration import load_calibration, load_image
from recipe_compiler.collect import collect_statistics
from recipe_compiler.compile import CompileConfig, compile_recipe
from recipe_compiler.models import build_random


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llava", help="'mid' or a registry alias, built with random weights")
    parser.add_argument("--budget", type=float, default=0.45)
    parser.add_argument("--samples", type=int, default=None, help="calibration samples (default: all shipped calib samples)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out")
    args = parser.parse_args()

    stages: dict[str, float] = {}
    start = time.perf_counter()
    loaded = build_random(spec_for(args.model), device=args.device, dtype=args.dtype)
    stages["load"] = time.perf_counter() - start

    start = time.perf_counter()
    calibration = load_calibration(samples=args.samples)
    stages["read_calibration"] = time.perf_counter() - start

    model, processor = loaded.model, loaded.processor
    batches = [calibration.samples[i : i + args.batch_size] for i in range(0, len(calibration), args.batch_size)]
    encoded = [
        processor(images=[load_image(s) for s in b], text=[loaded.format_prompt(s.prompt) for s in b], return_tensors="pt", padding=True).to(args.device)
        for b in batches
    ]
    with torch.no_grad():
        model(**encoded[0], use_cache=False, logits_to_keep=1)  # warm-up
        start = time.perf_counter()
        for inputs in encoded:
            model(**inputs, use_cache=False, logits_to_keep=1)
        plain = time.perf_counter() - start

    start = time.perf_counter()
    stats = collect_statistics(model, processor, calibration, format_prompt=loaded.format_prompt, batch_size=args.batch_size)
    stages["calibrate"] = time.perf_counter() - start

    searches = {}
    for search in ("optimal", "fitprune"):
        result = compile_recipe(model, processor, calibration, CompileConfig(args.budget, search=search, batch_size=args.batch_size),
                                format_prompt=loaded.format_prompt, statistics=stats)
        searches[search] = {
            "search_s": round(result.timings["search"], 4),
            "verify_s": round(result.timings["verify"], 4),
            "flops_fraction": round(result.verification.flops_fraction, 6),
            "divergence": round(result.divergence, 6),
            "kl": round(result.verification.kl, 6),
        }
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            result.recipe.save(Path(folder) / "r.safetensors")
            searches[search]["write_s"] = round(time.perf_counter() - start, 5)

    emit({
        "bench": "compile",
        "machine": machine(),
        "model": args.model,
        "budget": args.budget,
        "samples": len(calibration),
        "batch_size": args.batch_size,
        "stages_s": {k: round(v, 4) for k, v in stages.items()},
        "searches": searches,
        "calibration_overhead": {
            "plain_sdpa_forward_s": round(plain, 4),
            "statistics_pass_s": round(stages["calibrate"], 4),
            "ratio": round(stages["calibrate"] / plain, 3),
        },
    }, args.out)


if __name__ == "__main__":
    main()

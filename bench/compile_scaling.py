"""Compile time split by stage vs calibration size, and calibration overhead vs a plain SDPA forward.

For each calibration size: read + validate the set, calibrate (attention statistics), search
(optimal), verify (pruned and unpruned forwards), write; and plain ``use_cache=False`` forwards of
the same batches, so ``calibrate / plain`` is the statistics pass's overhead.

    python bench/compile_scaling.py --out bench/results/compile-scaling-tiny-llava-cpu.json
    python bench/compile_scaling.py --model mid --sizes 4,8 --out bench/results/compile-scaling-mid-cpu.json
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from common import emit, machine, spec_for

from recipe_compiler.calibration import load_calibration
from recipe_compiler.collect import model_inputs
from recipe_compiler.compile import CompileConfig, compile_recipe
from recipe_compiler.distributed import batches_of
from recipe_compiler.models import build_random


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llava", help="'mid' or a registry alias, built with random weights")
    parser.add_argument("--sizes", default="4,8,16,30")
    parser.add_argument("--budget", type=float, default=0.45)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out")
    args = parser.parse_args()

    load_avg_start = os.getloadavg()
    start = time.perf_counter()
    loaded = build_random(spec_for(args.model), device=args.device, dtype=args.dtype)
    load_s = time.perf_counter() - start
    model = loaded.model
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        start = time.perf_counter()
        calibration = load_calibration(samples=size)
        read_s = time.perf_counter() - start

        start = time.perf_counter()
        with torch.no_grad():
            for _, batch in batches_of(calibration.samples, args.batch_size):
                model(**model_inputs(model, loaded.processor, batch, loaded.format_prompt), use_cache=False)
        plain_s = time.perf_counter() - start

        result = compile_recipe(model, loaded.processor, calibration, CompileConfig(args.budget, batch_size=args.batch_size, pre_llm="none"),
                                format_prompt=loaded.format_prompt)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as folder:
            result.recipe.save(Path(folder) / "r.safetensors")
        write_s = time.perf_counter() - start
        row = {
            "samples": size,
            "stages_s": {"read_calibration": round(read_s, 4), "calibrate": round(result.timings["calibrate"], 4),
                         "search": round(result.timings["search"], 4), "verify": round(result.timings["verify"], 4),
                         "write": round(write_s, 5)},
            "plain_sdpa_forward_s": round(plain_s, 4),
            "calibration_overhead": round(result.timings["calibrate"] / plain_s, 3),
            "flops_fraction": round(result.verification.flops_fraction, 6),
        }
        rows.append(row)
        print(row, flush=True)
    emit({
        "bench": "compile_scaling",
        "machine": machine(),
        "load_average_start_end": [round(x, 2) for x in load_avg_start + os.getloadavg()],
        "model": args.model,
        "budget": args.budget,
        "batch_size": args.batch_size,
        "load_model_s": round(load_s, 3),
        "results": rows,
        "notes": "calibration_overhead = statistics pass / plain use_cache=False forwards of the same batches (the model loads once).",
    }, args.out)


if __name__ == "__main__":
    main()

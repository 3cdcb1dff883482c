"""Separable vs nested vs verified divergence (docs/methods.md §2, "Nested selection").

For each built-in tiny family, budget, scorer and table search: compile on the shipped
calibration set, then compare the search's separable objective and the nested prediction (the
runtime's rule on the statistics) with the verified divergence (the tokens the real runtime kept).

    OMP_NUM_THREADS=1 python bench/nested_gap.py --out bench/results/nested-gap-tiny-cpu.json
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from common import emit, machine

from recipe_compiler import CompileConfig, compile_recipe, load_calibration, load_model
from recipe_compiler.errors import BudgetError

FAMILIES = ("tiny-llava", "tiny-llava-next", "tiny-qwen2-vl", "tiny-qwen2.5-vl")


def load(name: str):
    if name == "tiny-qwen2.5-vl":
        from recipe_compiler.qwen2_vl import build_tiny_qwen2_5_vl

        return build_tiny_qwen2_5_vl(seed=0, attn_implementation="sdpa")
    return load_model(name, seed=0, attn_implementation="sdpa")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(FAMILIES))
    parser.add_argument("--budgets", default="0.45,0.25")
    parser.add_argument("--samples", type=int, default=None, help="calibration samples (default: the shipped 30)")
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_start = os.getloadavg()
    calibration = load_calibration(samples=args.samples)
    rows = []
    for name in args.models.split(","):
        loaded = load(name)
        collected = {}  # head reduction -> statistics (each scorer's own: last-token averages the heads)
        for budget in map(float, args.budgets.split(",")):
            for scorer in ("fitprune", "text-mean", "last-token"):
                for search in ("optimal", "gsearch", "psigmoid"):
                    started = time.perf_counter()
                    config = CompileConfig(budget=budget, scorer=scorer, search=search, pre_llm="none")
                    try:
                        result = compile_recipe(loaded.model, loaded.processor, calibration, config,
                                                format_prompt=loaded.format_prompt, statistics=collected.get(config.head_reduce))
                    except BudgetError as exc:
                        rows.append({"model": name, "budget": budget, "scorer": scorer, "search": search, "infeasible": str(exc)})
                        break
                    collected[config.head_reduce] = result.statistics
                    verified = result.verification.divergence
                    rows.append({
                        "model": name, "budget": budget, "scorer": scorer, "search": search,
                        "keep_count": result.recipe.keep_count.tolist(),
                        "separable": result.divergence, "nested": result.nested_divergence, "verified": verified,
                        "separable_gap_rel": abs(result.divergence - verified) / verified,
                        "nested_gap_rel": abs(result.nested_divergence - verified) / verified,
                        "seconds": time.perf_counter() - started,
                    })
                    print({k: rows[-1][k] for k in ("model", "budget", "scorer", "search", "separable_gap_rel", "nested_gap_rel")}, flush=True)
    done = [r for r in rows if "verified" in r]
    emit({
        "machine": machine(),
        "load_average_start_end": [load_start[0], os.getloadavg()[0]],
        "samples": len(calibration),
        "max_separable_gap_rel": max(r["separable_gap_rel"] for r in done),
        "max_nested_gap_rel": max(r["nested_gap_rel"] for r in done),
        "rows": rows,
    }, args.out)


if __name__ == "__main__":
    main()

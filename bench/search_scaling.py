"""Schedule-search time vs layers × visual tokens, on synthetic divergence tables (no model).

The searches see only two ``[L, V + 1]`` tables: divergence (from calibration statistics) and
FLOPs per layer. Here the divergence table is synthetic: per layer, a random heavy-tailed attention
mass over ``V`` tokens, sorted, ``D[l, k] = -log(mass kept by the top k)`` scaled by a per-layer
sensitivity; the FLOPs table is the exact one for a 7B-class Llama (d 4096, m 11008, 32 heads) with
64 text tokens. Budget 0.45. Sizes up to 80 layers × 2880 tokens (a 70B-depth model with a
LLaVA-NeXT 672-px image).

    python bench/search_scaling.py --out bench/results/search-scaling-cpu.json
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from common import emit, machine

from recipe_compiler.flops import LMShape, cost_table
from recipe_compiler.search import TABLE_SEARCHES as SEARCHES


def synthetic_table(layers: int, tokens: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mass = np.sort(rng.pareto(1.2, size=(layers, tokens)) + 1e-3, axis=1)[:, ::-1]
    kept = np.concatenate([np.zeros((layers, 1)), np.cumsum(mass, axis=1) / mass.sum(axis=1, keepdims=True)], axis=1)
    sensitivity = np.linspace(2.0, 0.3, layers)[:, None]  # early layers matter more
    table = sensitivity * -np.log(np.maximum(kept, 1e-6))
    table[:, -1] = 0.0
    table[0, :-1] = np.inf  # every visual token enters layer 0
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="8,32,40,80")
    parser.add_argument("--tokens", default="576,1152,2880")
    parser.add_argument("--searches", default="optimal,gsearch,psigmoid")
    parser.add_argument("--budget", type=float, default=0.45)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args()
    rows = []
    for layers in [int(x) for x in args.layers.split(",")]:
        shape = LMShape(num_layers=layers, hidden=4096, intermediate=11008, num_heads=32, num_kv_heads=32, head_dim=128)
        for tokens in [int(x) for x in args.tokens.split(",")]:
            table = synthetic_table(layers, tokens)
            costs = cost_table(shape, [64], [tokens], tokens)
            budget_flops = args.budget * float(costs[:, tokens].sum())
            row = {"layers": layers, "visual_tokens": tokens}
            for name in args.searches.split(","):
                times = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    keep = SEARCHES[name](table, costs, budget_flops)
                    times.append(time.perf_counter() - start)
                spent = float(costs[np.arange(layers), keep].sum()) / float(costs[:, tokens].sum())
                row[name] = {"median_s": round(float(np.median(times)), 5), "max_s": round(max(times), 5),
                             "flops_fraction": round(spent, 6),
                             "divergence": round(float(table[np.arange(layers), keep].sum()), 6)}
            rows.append(row)
            print(row, flush=True)
    emit({
        "bench": "search_scaling",
        "machine": machine(),
        "budget": args.budget,
        "repeats": args.repeats,
        "results": rows,
        "notes": "synthetic divergence tables (seeded), exact 7B-class FLOPs table with 64 text tokens; "
                 "times are the schedule search alone (the divergence table from statistics is built once before it)",
    }, args.out)


if __name__ == "__main__":
    main()

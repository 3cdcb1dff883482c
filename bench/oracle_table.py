"""The README's "Against an oracle" table from the sweep's JSON files (``bench/oracle_sweep.sh``).

``python bench/oracle_table.py [results dir]`` prints one Markdown row per family and budget, the
mid LLaVA first, then the families alphabetically, and the range of each ratio below the table.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

FAMILIES = ["gemma3", "internvl", "llava-next", "llava-onevision", "qwen2-vl", "qwen2.5-vl", "qwen3-vl", "qwen3.5"]
HEADER = ("| model | requested | timed budget | visual tokens, cuts (layer: count) | pruned / oracle | paired (95 % interval) "
          "| oracle / unpruned | runtime share (probe / top-k+gather / masks, ms) | load avg (start, end) |")


def cuts(keep_count: list) -> str:
    """``576 → 1: 190``: the reference image's tokens, then each layer whose count changes."""
    steps = [f"{layer}: {count}" for layer, count in enumerate(keep_count) if layer and count != keep_count[layer - 1]]
    return " → ".join([str(keep_count[0]), *steps])


def rows(name: str, result: dict) -> list[str]:
    out = []
    load = result["load_average_start_end"]
    for row in result["results"]:
        low, high = row["pruned_speed_vs_oracle_paired_ci95"]
        overhead = row["overhead_ms"]
        share = (f"{row['overhead_share_of_pruned_prefill'] * 100:.1f} % ({overhead['scoring_probe_ms']:.1f} / "
                 f"{overhead['select_and_gather_ms']:.1f} / {overhead['mask_rebuild_ms']:.1f})")
        out.append(f"| {name} | {row.get('requested_budget', row['budget'])} | {row['budget']} | {cuts(row['keep_count'])} "
                   f"| {row['pruned_speed_vs_oracle']:.3f} | {row['pruned_speed_vs_oracle_paired']:.3f} ({low:.3f}–{high:.3f}) "
                   f"| {row['oracle_speedup']:.2f}× | {share} | {load[0]}, {load[3]} |")
    return out


def main() -> None:
    results = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results")
    files = [("mid", results / "runtime-mid-oracle-cpu.json")]
    files += [(f"mid-{family}", results / f"runtime-mid-{family}-oracle-cpu.json") for family in FAMILIES]
    print(HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1))
    headline, paired, bounds = [], [], []
    for name, path in files:
        result = json.loads(path.read_text())
        print("\n".join(rows(name, result)))
        for row in result["results"]:
            headline.append(row["pruned_speed_vs_oracle"])
            paired.append(row["pruned_speed_vs_oracle_paired"])
            bounds.append(row["pruned_speed_vs_oracle_paired_ci95"][0])
    print(f"\npruned/oracle {min(headline):.4f}–{max(headline):.4f} (ratio of medians), paired {min(paired):.4f}–"
          f"{max(paired):.4f}, lowest 95 % lower bound {min(bounds):.4f}; rows under 0.97: "
          f"{sum(h < 0.97 for h in headline)} of {len(headline)}")


if __name__ == "__main__":
    main()

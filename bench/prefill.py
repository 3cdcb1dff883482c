"""Prefill time and KV-cache bytes: pruned vs unpruned vs the ideal, at several budgets.

For each budget a recipe is compiled (optimal search, fitprune scorer) on a few calibration
samples, then one prompt's prefill (``use_cache=True``, batch ``--batch``) is timed with and
without the recipe. The ideal is what the FLOPs budget promises: time × flops_fraction for the
language model (the vision encoder is not pruned and is reported separately).

    python bench/prefill.py                                # mid-size random LLaVA on this CPU
    python bench/prefill.py --model llava-1.5-7b --device cuda --dtype bfloat16 --out bench/results/prefill-h100.json

Prints JSON; ``--out`` also writes it.
"""
from __future__ import annotations

import argparse
import inspect

import torch

from common import emit, machine, paired, prepare, timed

from recipe_compiler.compile import CompileConfig, compile_recipe
from recipe_compiler.errors import BudgetError
from recipe_compiler.evaluate import kv_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mid", help="'mid' (default), 'mid-llava-next', 'mid-qwen2-vl' or a registry alias, built with random weights")
    parser.add_argument("--budgets", default="1.0,0.45,0.25")
    parser.add_argument("--samples", type=int, default=8, help="calibration samples used to compile each recipe")
    parser.add_argument("--batch", type=int, default=1, help="prompts per timed prefill")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out")
    args = parser.parse_args()

    loaded, calibration, stats, inputs = prepare(args.model, args.samples, args.batch, args.device, args.dtype)
    model = loaded.model

    def prefill():
        with torch.no_grad():
            return model(**inputs, use_cache=True, logits_to_keep=1)

    image_features = model.model.get_image_features
    vision_inputs = {k: v for k, v in inputs.items() if k in inspect.signature(image_features).parameters}

    def vision():  # the family's own feature path (image_sizes for NeXT, image_grid_thw for Qwen)
        with torch.no_grad():
            image_features(**vision_inputs)

    unpruned_kv = kv_bytes(prefill().past_key_values)
    vision_time = timed(vision, args.repeats, device=args.device)
    results = []
    for budget in [float(b) for b in args.budgets.split(",")]:
        try:
            compiled = compile_recipe(model, loaded.processor, calibration, CompileConfig(budget, pre_llm="none"), format_prompt=loaded.format_prompt, statistics=stats)
        except BudgetError as error:  # e.g. few visual tokens next to long byte-level prompts
            results.append({"budget": budget, "infeasible": str(error)})
            continue
        recipe = compiled.recipe
        handles = []
        unpruned, pruned = paired(
            prefill, prefill, lambda: handles.append(recipe.apply(model)), lambda: handles.pop().remove(),
            args.repeats, device=args.device,
        )
        with recipe.apply(model) as handle:
            pruned_kv = kv_bytes(prefill().past_key_values)
            request = handle.last_request
        tokens = (torch.stack(request.tokens_per_layer, 1).float().mean(0) if request else
                  inputs["attention_mask"].sum(1).float().mean().expand(recipe.num_layers))
        fraction = compiled.verification.flops_fraction
        lm_unpruned = unpruned["median_ms"] - vision_time["median_ms"]
        lm_pruned = pruned["median_ms"] - vision_time["median_ms"]
        results.append({
            "budget": budget,
            "flops_fraction": round(fraction, 6),
            "keep_count": recipe.keep_count.tolist(),
            "visual_token_equivalent": round(compiled.visual_token_equivalent, 2),
            "prefill_ms": round(pruned["median_ms"], 2),
            "unpruned_prefill_ms": round(unpruned["median_ms"], 2),
            "prefill_ms_range": [round(pruned["min_ms"], 2), round(pruned["max_ms"], 2)],
            "speedup": round(unpruned["median_ms"] / pruned["median_ms"], 3),
            "lm_speedup": round(lm_unpruned / lm_pruned, 3),
            "ideal_lm_speedup": round(1 / fraction, 3),
            "lm_speedup_vs_ideal": round((lm_unpruned / lm_pruned) * fraction, 3),
            "kv_bytes": pruned_kv,
            "kv_fraction": round(pruned_kv / unpruned_kv, 4),
            "ideal_kv_fraction": round(float(tokens.mean()) / inputs["attention_mask"].sum(1).float().mean().item(), 4),
            "kl": round(compiled.verification.kl, 6),
        })
    emit({
        "bench": "prefill",
        "machine": machine(),
        "model": {"name": args.model, "layers": model.config.text_config.num_hidden_layers,
                  "hidden": model.config.text_config.hidden_size, "visual_tokens": stats.max_visual,
                  "random_weights": True, "dtype": args.dtype, "device": args.device},
        "prompt_tokens": int(inputs["attention_mask"].sum(1).max()),
        "batch": args.batch,
        "calibration_samples": args.samples,
        "unpruned": {"kv_bytes": unpruned_kv,
                     "vision_encoder_ms": round(vision_time["median_ms"], 2)},
        "results": results,
        "notes": "speedup = unpruned / pruned prefill wall time (medians of alternating runs); lm_* subtract the unpruned vision-encoder time; "
                 "ideal_lm_speedup = 1 / flops_fraction; kv_fraction = pruned / unpruned KV bytes after prefill.",
    }, args.out)


if __name__ == "__main__":
    main()

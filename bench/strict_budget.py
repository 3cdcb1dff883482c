"""Strict per-request budget: FLOPs and fidelity on held-out prompts, default mode vs strict mode.

For each budget a recipe is compiled (optimal search, fitprune scorer) on the calibration set;
then every held-out prompt (the shipped held-out split, three of them with a longer question and
one with a one-word question: none is a calibration prompt) runs unpruned, with the recipe, and
with ``recipe.apply(model, strict_budget=True)``. Per request: its exact FLOPs fraction (what the
runtime ran, probes included), the KL(unpruned ‖ pruned) of the next-token distribution and
whether the top-1 token agrees.

    python bench/strict_budget.py --model testbed-llava --out bench/results/strict-budget-testbed-cpu.json
    python bench/strict_budget.py --model tiny-llava

Prints JSON; ``--out`` also writes it.
"""
from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import torch

from common import emit, machine

from recipe_compiler.calibration import load_calibration
from recipe_compiler.collect import model_inputs
from recipe_compiler.compile import CompileConfig, compile_recipe
from recipe_compiler.flops import LMShape, stack_flops
from recipe_compiler.models import load_model
from runtime.methods.scorers import SCORERS

LONGER = " Explain which details of the picture support your answer, and say how sure you are."


def held_out():
    samples = load_calibration(split="heldout").samples
    return list(samples) + [dataclasses.replace(s, prompt=s.prompt + LONGER) for s in samples[:3]] + \
        [dataclasses.replace(samples[0], prompt="Colour?")]


def run(model, recipe, inputs, **options):
    shape = LMShape.from_config(model.config.text_config)
    scorer = SCORERS[recipe.scorer]
    with recipe.apply(model, **options) as handle, torch.no_grad():
        logits = model(**inputs, use_cache=False, logits_to_keep=1).logits[0, -1].float()
        request = handle.last_request
    tokens = torch.stack(request.tokens_per_layer, dim=1)[0].numpy().astype(np.float64)
    visual = torch.stack(request.visual_per_layer, dim=1)[0].numpy().astype(np.float64)
    before, text = float(request.roles.n_before[0]), float(request.roles.text[0].sum())
    spent = float(stack_flops(shape, tokens, visual).sum())
    for layer in recipe.pruning_layers:
        spent += 2.0 * float(scorer.probe_macs(shape, tokens[layer - 1], visual[layer - 1], before, text))
    n_visual = float(request.roles.n_visual_input[0])
    unpruned = float(stack_flops(shape, np.full(shape.num_layers, float(inputs["attention_mask"].sum())),
                                 np.full(shape.num_layers, n_visual)).sum())
    return spent / unpruned, logits, visual.astype(int).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llava")
    parser.add_argument("--samples", type=int, default=None, help="calibration samples (default: all)")
    parser.add_argument("--budgets", default="0.45,0.3")
    parser.add_argument("--out")
    args = parser.parse_args()

    loaded = load_model(args.model)
    model = loaded.model
    calibration = load_calibration(samples=args.samples)
    prompts = held_out()
    rows, stats = [], None
    for budget in [float(b) for b in args.budgets.split(",")]:
        compiled = compile_recipe(model, loaded.processor, calibration, CompileConfig(budget, pre_llm="none"), format_prompt=loaded.format_prompt,
                                  statistics=stats)
        stats, recipe = compiled.statistics, compiled.recipe
        per_prompt = []
        for sample in prompts:
            inputs = model_inputs(model, loaded.processor, [sample], loaded.format_prompt)
            with torch.no_grad():
                full = model(**inputs, use_cache=False, logits_to_keep=1).logits[0, -1].float()
            log_p = torch.log_softmax(full, -1)
            entry = {"prompt_tokens": int(inputs["attention_mask"].sum()), "prompt": sample.prompt[:60]}
            for mode, options in (("default", {}), ("strict", {"strict_budget": True})):
                fraction, logits, visual = run(model, recipe, inputs, **options)
                log_q = torch.log_softmax(logits, -1)
                entry[mode] = {"flops_fraction": round(fraction, 5),
                               "kl": round(float((log_p.exp() * (log_p - log_q)).sum().clamp(min=0)), 6),
                               "top1_agree": bool(full.argmax() == logits.argmax()), "visual_per_layer": visual}
            per_prompt.append(entry)
        summary = {}
        for mode in ("default", "strict"):
            fractions = np.array([p[mode]["flops_fraction"] for p in per_prompt])
            summary[mode] = {"mean_flops_fraction": round(float(fractions.mean()), 5), "max_flops_fraction": round(float(fractions.max()), 5),
                             "requests_over_budget": int(np.sum(fractions > budget * (1 + 1e-9))),
                             "mean_kl": round(float(np.mean([p[mode]["kl"] for p in per_prompt])), 6),
                             "top1_agreement": round(float(np.mean([p[mode]["top1_agree"] for p in per_prompt])), 4)}
        rows.append({"budget": budget, "keep_count": recipe.keep_count.tolist(),
                     "calibration_flops_fraction": round(compiled.verification.flops_fraction, 6),
                     "summary": summary, "requests": per_prompt})
    emit({"bench": "strict_budget", "model": args.model, "machine": machine(), "calibration_samples": len(calibration),
          "held_out_requests": len(prompts),
          "notes": "per request: flops_fraction = what the runtime ran (tokens per layer, scorer probes included) / the unpruned "
                   "prefill; kl = KL(unpruned || pruned) of the next-token distribution. A request whose floor (every visual "
                   "token dropped at the first cut) is above the budget runs at that floor in strict mode.",
          "results": rows}, args.out)


if __name__ == "__main__":
    main()

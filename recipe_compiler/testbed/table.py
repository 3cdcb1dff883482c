"""Accuracy vs verified FLOPs of pruning recipes on the trained testbed (the bench and its test).

For every recipe, one pruned prefill per question (``logits_to_keep=1``): the greedy first token
against the one-token answer (exact match; every testbed answer is one token), the FLOPs from the
token counts that really entered each layer (the same sum as :func:`recipe_compiler.verify.verify_recipe`),
KL and top-1 agreement against the unpruned prefill, which is run once and shared by all recipes.

Recipes (per budget): the default compile (``CompileConfig(budget)``: ``--pre-llm auto``, the
stage with the least measured drift, ``none`` included), the four searches alone in the language
model (``optimal``, ``gsearch``, ``psigmoid``, ``fitprune``; scorer fitprune; no pre-LLM stage), every fixed-ratio pre-LLM stage alone at the ratio whose FLOPs meet the budget (no in-LLM
pruning; ``random`` is the chance baseline; a stage whose count is the image's own, PruMerge+, is
compiled with the optimal search for the rest of the budget), ``cls-inflection`` as compiled, the ``random`` in-LLM
scorer with the optimal schedule, and the optimal search on the ``text`` objective (text-mean scorer). Plus keep-all and the image removed (every visual token dropped
on entry to layer 0).

Example:
    python bench/testbed_accuracy.py --questions 1000 --out bench/results/testbed-accuracy.json
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

SEARCH_NAMES = ("optimal", "gsearch", "psigmoid", "fitprune")
PURE_STAGES = ("g-prune", "fopru-rank", "fopru-row", "random")
TEXT_OBJECTIVE = "optimal · text objective"  # the optimal search on the text term alone, text-mean scorer
DEFAULT = "default (auto)"  # CompileConfig(budget): the optimal search with --pre-llm auto


@dataclass
class Entry:
    """One recipe of the table: ``method`` (the line it belongs to), ``budget`` (None: keep-all / no image)."""

    method: str
    budget: float | None
    recipe: Any
    compile_s: float = 0.0


def stage_ratio_for_budget(shape: Any, n_other: np.ndarray, v: int, budget: float) -> float:
    """The keep ratio of a pre-LLM stage alone (every kept token through every layer) whose mean
    prefill FLOPs are at most ``budget`` of the unpruned ones: the largest ``k / v`` that fits."""
    from ..flops import layer_flops

    full = float(np.mean(layer_flops(shape, n_other + v)))
    best = 1
    for k in range(1, v + 1):
        if float(np.mean(layer_flops(shape, n_other + k))) <= budget * full * (1 + 1e-9):
            best = k
    return best / v


def build_entries(loaded: Any, calibration: Any, budgets: Sequence[float], *, log: Callable[[str], None] = print,
                  searches: Sequence[str] = SEARCH_NAMES, stages: Sequence[str] = PURE_STAGES,
                  cls_inflection: bool = True, random_scorer: bool = True, text_objective: bool = True,
                  default: bool = True) -> list[Entry]:
    """Compile (or construct) every recipe of the table on ``calibration``."""
    from runtime import Recipe
    from runtime.families import family_for, model_fingerprint
    from runtime.methods.stages import STAGES

    from ..collect import collect_statistics
    from ..compile import CompileConfig, compile_recipe
    from ..families import lm_shape
    from ..flops import LMShape

    model, processor = loaded.model, loaded.processor
    fp = model_fingerprint(model)
    v, layers = int(fp["visual_tokens"]), int(fp["num_layers"])
    shape = lm_shape(model)
    by_reduction: dict = {}

    def statistics_for(head_reduce: str):
        # One calibration pass per head reduction (FitPrune's max; the peers' mean), shared by every recipe.
        if head_reduce not in by_reduction:
            started = time.perf_counter()
            by_reduction[head_reduce] = collect_statistics(model, processor, calibration, format_prompt=loaded.format_prompt,
                                                           head_reduce=head_reduce)
            log(f"calibration statistics ({head_reduce} over heads) on {len(calibration)} samples: {time.perf_counter() - started:.1f}s")
        return by_reduction[head_reduce]

    stats = statistics_for("max")
    entries = [Entry("keep-all", None, Recipe.keep_all(fp))]

    def compiled(method: str, budget: float, **kw) -> None:
        t0 = time.perf_counter()
        try:
            config = CompileConfig(budget=budget, **kw)
            result = compile_recipe(model, processor, calibration, config, format_prompt=loaded.format_prompt,
                                    statistics=statistics_for(config.head_reduce))
        except Exception as exc:  # noqa: BLE001 - a method that cannot meet a budget is reported, not fatal
            log(f"  {method} @ {budget}: not compiled ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})")
            return
        entries.append(Entry(method, budget, result.recipe, time.perf_counter() - t0))
        log(f"  {method} @ {budget}: compiled in {time.perf_counter() - t0:.1f}s, calibration flops "
            f"{result.verification.flops_fraction:.4f}")

    n_other = np.asarray(stats.n_other, dtype=np.int64)
    for budget in budgets:
        if default:
            compiled(DEFAULT, budget)
        for search in searches:  # the in-LLM schedule alone: what each search finds
            compiled(search, budget, search=search, pre_llm="none")
        for stage in stages:
            if not STAGES[stage].fixed_ratio:  # its count is the image's own (PruMerge+): compiled, the search fills the budget
                compiled(stage, budget, pre_llm=stage)
                continue
            ratio = stage_ratio_for_budget(shape, n_other, v, budget)
            try:
                entries.append(Entry(stage, budget, Recipe(keep_count=np.full(layers, v, dtype=np.int64), scorer="fitprune",
                                                           fingerprint=fp, pre_llm={"method": stage, "keep_ratio": ratio, "params": {}})))
            except Exception as exc:  # noqa: BLE001 - a stage that takes no fixed ratio is reported, not fatal
                log(f"  {stage} @ {budget}: no fixed-ratio recipe ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})")
        if cls_inflection:
            compiled("cls-inflection", budget, pre_llm="cls-inflection")
        if random_scorer:
            compiled("random (in-LLM)", budget, scorer="random", pre_llm="none")
        if text_objective:
            compiled(TEXT_OBJECTIVE, budget, objective="text", scorer="text-mean", pre_llm="none")
    return entries


def prepare_batches(loaded: Any, samples: Sequence[Any], batch_size: int = 8) -> list[tuple[dict, list]]:
    """Processor inputs of the held-out questions, batched (left padded), with the answers' token ids."""
    from ..collect import model_inputs

    tokenizer = loaded.processor.tokenizer
    out = []
    for start in range(0, len(samples), batch_size):
        batch = list(samples[start:start + batch_size])
        inputs = model_inputs(loaded.model, loaded.processor, batch, loaded.format_prompt)
        answers = [tokenizer(s.answer, add_special_tokens=False).input_ids[0] for s in batch]
        out.append((inputs, answers, batch))
    return out


def unpruned_reference(model: Any, batches: list) -> list:
    """Unpruned last-position log-probabilities of every batch (computed once, shared by all recipes)."""
    import torch

    refs = []
    with torch.no_grad():
        for inputs, _, _ in batches:
            refs.append(torch.log_softmax(model(**inputs, use_cache=False, logits_to_keep=1).logits[:, -1].float(), dim=-1))
    return refs


def measure(model: Any, batches: list, refs: list, recipe: Any) -> dict:
    """Accuracy (overall, per type), verified FLOPs fraction, KL and top-1 agreement of ``recipe``."""
    import torch
    from runtime.families import family_for

    from ..accuracy import accuracy_report
    from ..families import lm_shape
    from ..flops import LMShape, layer_flops

    shape = lm_shape(model)
    correct, qtypes, pruned, full, kls, agree, visual = [], [], [], [], [], [], []
    with torch.no_grad(), recipe.apply(model) as handle:
        for (inputs, answers, batch), ref in zip(batches, refs):
            logits = model(**inputs, use_cache=False, logits_to_keep=1).logits[:, -1].float()
            request = handle.last_request
            real = inputs["attention_mask"].sum(dim=1).cpu().numpy().astype(np.float64)
            if request is not None:
                tokens = torch.stack(request.tokens_per_layer, dim=1).cpu().numpy().astype(np.float64)
                vis = torch.stack(request.visual_per_layer, dim=1).cpu().numpy().astype(np.float64)
            else:
                tokens = np.repeat(real[:, None], shape.num_layers, axis=1)
                n_vis = (inputs["input_ids"] == handle.image_token_id).sum(dim=1).cpu().numpy().astype(np.float64)
                vis = np.repeat(n_vis[:, None], shape.num_layers, axis=1)
            pruned.append(layer_flops(shape, tokens).sum(axis=1))
            full.append(layer_flops(shape, real) * shape.num_layers)
            visual.append(vis.mean(axis=1))
            log_q = torch.log_softmax(logits, dim=-1)
            kls.append((ref.exp() * (ref - log_q)).sum(dim=-1).clamp(min=0).numpy())
            top = logits.argmax(-1)
            agree.append((top == ref.argmax(-1)).numpy())
            correct += [int(t) == a for t, a in zip(top.tolist(), answers)]
            qtypes += [s.qtype for s in batch]
    report = accuracy_report(correct, qtypes)
    return {**report, "flops_fraction": float(np.mean(np.concatenate(pruned)) / np.mean(np.concatenate(full))),
            "kl": float(np.mean(np.concatenate(kls))), "top1_agreement": float(np.mean(np.concatenate(agree))),
            "mean_visual_tokens": float(np.mean(np.concatenate(visual)))}


def measure_without_image(loaded: Any, samples: Sequence[Any], batch_size: int = 8) -> dict:
    """Accuracy of the same model with every visual token removed: the prompt without its image
    (``USER: \\n<question> ASSISTANT:``), what the model knows from the question alone."""
    import torch

    from ..accuracy import accuracy_report

    tokenizer = loaded.processor.tokenizer
    correct = []
    with torch.no_grad():
        for start in range(0, len(samples), batch_size):
            batch = list(samples[start:start + batch_size])
            enc = tokenizer([loaded.format_prompt(s.prompt).replace("<image>", "") for s in batch], return_tensors="pt", padding=True)
            logits = loaded.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False, logits_to_keep=1).logits[:, -1]
            answers = [tokenizer(s.answer, add_special_tokens=False).input_ids[0] for s in batch]
            correct += [int(t) == a for t, a in zip(logits.argmax(-1).tolist(), answers)]
    return {**accuracy_report(correct, [s.qtype for s in samples]), "flops_fraction": 0.0, "kl": None, "top1_agreement": None,
            "mean_visual_tokens": 0.0}


def plot_table(table: dict, path: Any) -> None:
    """Accuracy vs verified FLOPs, one line per method (keep-all and no-image as reference lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table["rows"]
    fig, ax = plt.subplots(figsize=(9, 6))
    ax.set_prop_cycle(color=plt.cm.tab20.colors)  # about twenty lines: ten colours would repeat
    ref = {r["method"]: r for r in rows if r["budget"] is None}
    for name, style in (("keep-all", "-"), ("no image", ":")):
        if name in ref:
            ax.axhline(100 * ref[name]["accuracy"], color="k", ls=style, lw=1, label=f"{name} ({100 * ref[name]['accuracy']:.1f}%)")
    methods = [m for m in dict.fromkeys(r["method"] for r in rows if r["budget"] is not None)]
    for m in methods:
        pts = sorted((r["flops_fraction"], 100 * r["accuracy"]) for r in rows if r["method"] == m)
        ax.plot(*zip(*pts), marker="o", ms=6 if m == DEFAULT else 4, lw=3.0 if m == DEFAULT else 1.4 if not m.startswith("random") else 1.0,
                ls="--" if m.startswith("random") else "-", label=m, **({"color": "k", "zorder": 5} if m == DEFAULT else {}))
    ax.set_xlabel("verified language-model prefill FLOPs (fraction of unpruned)")
    ax.set_ylabel(f"exact-match accuracy, % ({rows[0]['n']} held-out questions)")
    ax.set_title(f"testbed-llava: accuracy vs FLOPs (seed {table['heldout_seed']}, unseen in training)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

"""Train the testbed model from scratch on this CPU: ``python -m recipe_compiler.testbed.train``.

The recipe (measured; see issue 11):

* packing: every question of an image after one image prefix (block 4D mask, positions restarting
  after the prefix), so one vision pass trains ~12 questions exactly as they are evaluated;
* projector-output penalty ``0.1 * log(mean f^2)^2`` plus AdamW weight decay 0.1: the LM's RMSNorm
  makes the loss blind to the projector's scale, which otherwise grows without bound;
* a dense auxiliary loss (weight 0.5): a throwaway linear head on the projector outputs predicts each
  patch's colour, shape and digit (not shipped);
* a curriculum: plain backgrounds, few objects and big digit tiles first (difficulty ramps to 1 over
  the first 35 % of the time budget); learning rate warm-up then cosine decay over the time budget.

Runs on one thread. Checkpoints (``ckpt.pt``, resumable with ``--resume``; ``best.pt`` by held-out
accuracy) and ``log.jsonl`` (loss, projector RMS, held-out accuracy with and without the image, per
question type) go to ``--out``. ``--export DIR`` writes the best checkpoint as fp16 safetensors.

Example:
    nohup python -m recipe_compiler.testbed.train --out runs/testbed --minutes 100 &
    python -m recipe_compiler.testbed.train --out runs/testbed --export recipe_compiler/testbed/weights
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

from .model import CONFIG, build_model, image_features, pack, packed_logits, pixel_tensor
from .scenes import COLOUR_NAMES, QTYPES, SHAPES, make_scene
from .vocab import testbed_tokenizer

TRAIN_SEED_BASE = 100  # training scenes come from seeds >= 100; 1..99 are held out
VAL_SEED = 1  # held-out seed logged during training (the table uses another unseen seed)


def _log(path: Path, record: dict) -> None:
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def evaluate_packed(model, tokenizer, scenes, *, with_image: bool = True, batch: int = 8) -> dict:
    """Greedy first-token exact-match accuracy over the scenes' questions (packed forward)."""
    import torch

    per: dict[str, list[int]] = {}
    with torch.no_grad():
        for s in range(0, len(scenes), batch):
            chunk = scenes[s:s + batch]
            qs = [[(q.prompt, q.answer) for q in sc.questions] for sc in chunk]
            packed = pack(tokenizer, qs, with_image=with_image)
            pv = pixel_tensor([sc.image for sc in chunk]) if with_image else None
            logits, _ = packed_logits(model, packed, pv)
            flat = [q for sc in chunk for q in sc.questions]
            for (b, pos, aid), q in zip(packed["answer_pos"], flat):
                ok = int(int(logits[b, pos].argmax()) == aid)
                per.setdefault(q.qtype, [0, 0])
                per[q.qtype][0] += ok
                per[q.qtype][1] += 1
    right = sum(v[0] for v in per.values())
    total = sum(v[1] for v in per.values())
    return {"acc": right / max(total, 1), "n": total,
            "per_type": {k: round(v[0] / v[1], 4) for k, v in sorted(per.items())}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipe_compiler.testbed.train", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/testbed", help="run directory (checkpoints, log)")
    parser.add_argument("--minutes", type=float, default=90.0, help="training time budget (schedule length)")
    parser.add_argument("--batch", type=int, default=4, help="images per step")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--penalty", type=float, default=0.1, help="weight of log(mean f^2)^2")
    parser.add_argument("--aux", type=float, default=0.5, help="weight of the per-patch auxiliary loss")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-scenes", type=int, default=100)
    parser.add_argument("--eval-every", type=float, default=6.0, help="minutes between held-out evaluations")
    parser.add_argument("--ckpt-every", type=float, default=3.0, help="minutes between checkpoints")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--export", default=None, help="write OUT/best.pt as fp16 safetensors to this directory and exit")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.export:
        return export(out, Path(args.export))

    tokenizer = testbed_tokenizer()
    model = build_model(args.seed)
    d = model.config.text_config.hidden_size
    n_col, n_shape, n_dig = len(COLOUR_NAMES) + 1, len(SHAPES) + 1, 11
    aux_head = torch.nn.Linear(d, n_col + n_shape + n_dig)
    params = list(model.parameters()) + list(aux_head.parameters())
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98))
    step, elapsed, best = 0, 0.0, -1.0
    ckpt = out / "ckpt.pt"
    log = out / "log.jsonl"
    if args.resume and ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        aux_head.load_state_dict(state["aux"])
        opt.load_state_dict(state["opt"])
        step, elapsed, best = state["step"], state["elapsed"], state.get("best", -1.0)
        _log(log, {"event": "resume", "step": step, "elapsed_s": round(elapsed, 1)})
    else:
        _log(log, {"event": "start", "config": CONFIG, "args": vars(args),
                   "params": sum(p.numel() for p in model.parameters())})
    val = [make_scene(VAL_SEED, i) for i in range(args.eval_scenes)]
    budget = args.minutes * 60.0
    warmup = 150

    def save(path: Path, extra: dict | None = None) -> None:
        tmp = path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "aux": aux_head.state_dict(), "opt": opt.state_dict(),
                    "step": step, "elapsed": elapsed, "best": best, **(extra or {})}, tmp)
        os.replace(tmp, path)

    def run_eval() -> dict:
        nonlocal best
        model.eval()
        t0 = time.time()
        with_img = evaluate_packed(model, tokenizer, val)
        without = evaluate_packed(model, tokenizer, val, with_image=False)
        model.train()
        rec = {"event": "eval", "step": step, "elapsed_s": round(elapsed, 1), "acc": round(with_img["acc"], 4),
               "acc_no_image": round(without["acc"], 4), "n": with_img["n"], "per_type": with_img["per_type"],
               "per_type_no_image": without["per_type"], "eval_s": round(time.time() - t0, 1)}
        _log(log, rec)
        print(json.dumps(rec), flush=True)
        if with_img["acc"] > best:
            best = with_img["acc"]
            torch.save({"model": model.state_dict(), "step": step, "acc": best}, out / "best.pt")
        return rec

    model.train()
    last_ckpt = last_eval = time.time()
    window: list[dict] = []
    while elapsed < budget and (args.max_steps is None or step < args.max_steps):
        t0 = time.time()
        frac = elapsed / budget
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        d_max = min(1.0, 0.2 + frac / 0.35)
        import numpy as np

        rng = np.random.default_rng([TRAIN_SEED_BASE + args.seed, step])
        scenes = [make_scene(TRAIN_SEED_BASE + args.seed, step * args.batch + b, float(d_max * math.sqrt(rng.random())))
                  for b in range(args.batch)]
        packed = pack(tokenizer, [[(q.prompt, q.answer) for q in sc.questions] for sc in scenes])
        pv = pixel_tensor([sc.image for sc in scenes])
        feats = image_features(model, pv)
        logits, _ = packed_logits(model, packed, features=feats)
        lm_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), packed["targets"].flatten(), ignore_index=-100)
        penalty = torch.log(feats.float().pow(2).mean()) ** 2
        labels = torch.from_numpy(np.stack([sc.patch_labels for sc in scenes]))  # [B, 3, 256]
        aux = aux_head(feats)
        aux_loss = (torch.nn.functional.cross_entropy(aux[..., :n_col].flatten(0, 1), labels[:, 0].flatten())
                    + torch.nn.functional.cross_entropy(aux[..., n_col:n_col + n_shape].flatten(0, 1), labels[:, 1].flatten())
                    + torch.nn.functional.cross_entropy(aux[..., n_col + n_shape:].flatten(0, 1), labels[:, 2].flatten()))
        loss = lm_loss + args.penalty * penalty + args.aux * aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        dt = time.time() - t0
        elapsed += dt
        window.append({"lm": lm_loss.item(), "aux": aux_loss.item(), "rms": float(feats.detach().pow(2).mean().sqrt()),
                       "dt": dt})
        if step % 50 == 0:
            rec = {"event": "train", "step": step, "elapsed_s": round(elapsed, 1), "lr": round(lr, 6),
                   "difficulty": round(d_max, 3),
                   **{k: round(sum(w[k] for w in window) / len(window), 4) for k in window[0]}}
            window.clear()
            _log(log, rec)
            print(json.dumps(rec), flush=True)
        if time.time() - last_eval > args.eval_every * 60:
            run_eval()
            last_eval = time.time()
        if time.time() - last_ckpt > args.ckpt_every * 60:
            save(ckpt)
            last_ckpt = time.time()
    run_eval()
    save(ckpt)
    _log(log, {"event": "done", "step": step, "elapsed_s": round(elapsed, 1), "best": best})
    return 0


def export(out: Path, dest: Path) -> int:
    """``OUT/best.pt`` → ``DEST/model.safetensors`` (fp16) + ``DEST/train_log.jsonl``."""
    import shutil

    import torch
    from safetensors.torch import save_file

    state = torch.load(out / "best.pt", map_location="cpu", weights_only=False)
    dest.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in state["model"].items()}
    save_file(tensors, str(dest / "model.safetensors"), metadata={"step": str(state["step"]), "acc": str(state["acc"])})
    if (out / "log.jsonl").exists():
        shutil.copyfile(out / "log.jsonl", dest / "train_log.jsonl")
    print(f"exported step {state['step']} (held-out acc {state['acc']:.4f}) to {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

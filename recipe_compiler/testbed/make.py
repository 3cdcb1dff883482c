"""Write a testbed data set: ``python -m recipe_compiler.testbed.make --seed S --n N --out DIR``.

``DIR/images/sSEED_NNNNN.png`` (lossless, so evaluation sees the pixels the generator drew) and
``DIR/manifest.jsonl``: one line per question in the calibration format (``id``, ``image``,
``prompt``, ``kind`` = ``"short"``, ``split``) plus ``answer`` (one word) and ``qtype``. Usable as
``--calibration DIR`` and ``recipe-eval --data DIR``. Same seed and ``n``, same bytes.

``--n`` counts scenes (about 12 questions each); ``--questions`` stops at that many questions instead.
Training draws from seeds >= 100; seeds 1..99 are never trained on.

Example:
    python -m recipe_compiler.testbed.make --seed 2 --n 100 --out /tmp/testbed-heldout
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .scenes import make_scene

__all__ = ["write_dataset", "main"]


def write_dataset(seed: int, n: int, out: str | Path, *, split: str = "heldout", questions: int | None = None,
                  difficulty: float = 1.0) -> Path:
    """Write ``n`` scenes of ``seed`` (or scenes until ``questions`` questions) under ``out``.

    Args:
        seed: data seed.
        n: number of scenes (pictures).
        out: directory (created).
        split: the calibration ``split`` written on every line.
        questions: stop after this many questions (the last scene may contribute part of its own).
        difficulty: scene difficulty 0..1 (1.0 = the evaluation distribution).

    Returns:
        `Path`: the manifest written.
    """
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        scene = make_scene(seed, i, difficulty)
        name = f"images/s{seed}_{i:05d}.png"
        scene.image.save(out / name, format="PNG", optimize=False)
        for j, q in enumerate(scene.questions):
            lines.append(json.dumps({"id": f"s{seed}_{i:05d}_{j:02d}", "image": name, "prompt": q.prompt,
                                     "kind": "short", "split": split, "answer": q.answer, "qtype": q.qtype}))
            if questions is not None and len(lines) >= questions:
                break
        if questions is not None and len(lines) >= questions:
            break
    manifest = out / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipe_compiler.testbed.make", description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, required=True, help="data seed (1..99 are never trained on)")
    parser.add_argument("--n", type=int, required=True, help="number of scenes (about 12 questions each)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--questions", type=int, default=None, help="stop after this many questions")
    parser.add_argument("--split", default="heldout", choices=("calib", "heldout"))
    parser.add_argument("--difficulty", type=float, default=1.0)
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"--n must be at least 1, got {args.n}")
    manifest = write_dataset(args.seed, args.n, args.out, split=args.split, questions=args.questions,
                             difficulty=args.difficulty)
    count = sum(1 for _ in manifest.open(encoding="utf-8"))
    print(f"wrote {count} questions on {args.n} scenes to {manifest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

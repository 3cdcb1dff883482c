"""Write a tiny local lmms-eval task (3 held-out calibration images, exact-match answers) into a folder.

    python tests/lmms_task/make_task.py DIR   # then: lmms-eval --include_path DIR --tasks tiny_recipe ...
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

UTILS = '''from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc):
    return doc["question"]


def process_results(doc, results):
    return {"exact_match": float(results[0].strip() == doc["answer"])}
'''

YAML = """task: tiny_recipe
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 4
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  - version: 0.0
"""


def make_task(folder: Path, samples: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for line in (ROOT / "calibration_data" / "manifest.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if entry.get("split") == "heldout" and len(rows) < samples:
            rows.append({"image": str(ROOT / "calibration_data" / entry["image"]), "question": entry["prompt"], "answer": "yes"})
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "utils.py").write_text(UTILS)
    (folder / "tiny_recipe.yaml").write_text(YAML.format(data=data))
    return folder


if __name__ == "__main__":
    print(make_task(Path(sys.argv[1])))

"""The accuracy testbed: a generated visual-QA task and a small LLaVA trained on it in this repository.

* :mod:`.scenes` — the task: seeded scenes (shapes, colours, sizes, positions, a seven-segment digit,
  plain / textured / photographic backgrounds) and one-word questions about them, with per-patch labels.
* :mod:`.make` — ``python -m recipe_compiler.testbed.make --seed S --n N --out DIR`` writes a data set
  (``DIR/images/*.png`` + ``DIR/manifest.jsonl``, the calibration format plus ``answer`` and ``qtype``).
* :mod:`.vocab` — the word-level tokenizer (closed vocabulary of the task).
* :mod:`.train` — ``python -m recipe_compiler.testbed.train`` trains ``LlavaForConditionalGeneration``
  from scratch on this CPU.
"""

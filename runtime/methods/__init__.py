"""Pruning methods, each registered by name in the registry of its kind (names defined once).

* :mod:`.scorers`: which visual tokens go at an in-LLM pruning layer (``SCORERS``);
* :mod:`.heads`: how attention heads are combined when scoring (``HEAD_REDUCTIONS``);
* :mod:`.stages`: pre-LLM stages, which drop visual tokens before the language model (``STAGES``);
* :mod:`.detectors`: knee detectors of the CLS-similarity curve (``DETECTORS``).

The recipe loader validates against these registries and the CLI reads its choices from them.
"""

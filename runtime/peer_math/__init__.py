"""The selection and merge math of the peer methods, as pure torch functions (docs/methods.md §6).

No hooks, no I/O, no model objects: tensors in, a keep mask (or kept indices) and, for the
feature-producing methods, the features that replace the kept tokens out. The runtime's hooks and
the compiler's searches call these; the conformance tests check each one against a separate,
deliberately straightforward implementation of its reference's math.

One module per method, each faithful to its reference by default, with the reference's count
rule and its paper settings as data:

* :mod:`.fastv` — FastV: one cut at decoder layer K from the last prompt token's head-mean attention.
* :mod:`.pdrop` — PyramidDrop: ``int(n·λ^s)`` survivors at stage layers, scored by the pruning
  layer's own query/key for the last instruction token.
* :mod:`.visionzip` — VisionZip (pre-LLM): dominant tokens by CLS attention plus contextual tokens
  merged by key similarity; writes features.
* :mod:`.dart` — DART: pivots by key L1 norm, then the image tokens least similar to each pivot.
* :mod:`.divprune` — DivPrune (pre-LLM): greedy max–min cosine diversity.
* :mod:`.sparsevlm` — SparseVLM (v2 form): text raters, RoPE-corrected attention of the top heads.
* :mod:`.vtc_cls` — VTC-CLS (pre-LLM): CLS attention summed over a range of encoder layers.
* :mod:`.prumerge` — PruMerge / PruMerge+ (pre-LLM): IQR-outlier count, spatial samples, merge.

Ties everywhere here: among equal scores the **earlier** position wins (is kept), the rule of
``runtime.prellm``; NaN scores rank last.
"""

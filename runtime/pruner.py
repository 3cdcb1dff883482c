"""Visual-token pruning inside a stock HF vision-language model, by forward pre-hooks only.

At a pruning layer (prefill) the hooks gather the kept rows of the hidden states, of (cos, sin)
and of the position ids (kept tokens keep their original positions), rebuild the attention mask
from the pruned 2D mask with ``create_causal_mask(layer_idx=...)`` and hand the pruned versions to
every later layer. Rows of a batch that keep different counts are left re-padded with masked
dummies. Decode steps only need the mask rebuilt per pruning layer, since each cache layer holds
its own length. What to drop comes from a :class:`Policy`; a recipe is one policy, the compiler's
calibration pass and FitPrune search are others.

See ``notes/transformers-5.md`` in the design docs for the measured reasons behind each step.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field, replace
from typing import Any, Iterator

import torch

from . import attention
from .errors import PruningUnsupportedError, RecipeAlreadyAppliedError, RecipeMismatchError, StageCannotRun
from .families import family_for
from .log import logger
from .methods.scorers import SCORERS
from .methods.stages import NO_STAGE
from .prellm_stage import PreLLMStage
from .scoring import keep_top
from .state import PerThread


@dataclass
class Roles:
    """What each position of the current (possibly pruned) prefill sequence is. All (B, L)."""

    valid: torch.Tensor  # a real token (not padding, not a re-padding dummy)
    visual: torch.Tensor  # a visual token still alive
    text: torch.Tensor  # a real token after the last visual token of its row
    orig_index: torch.Tensor  # position in the original prompt
    n_visual_input: torch.Tensor  # (B,) visual tokens the row had entering the language model
    n_before: torch.Tensor | None = None  # (B,) real tokens before the row's first image token (never pruned)

    def gather(self, index: torch.Tensor, valid: torch.Tensor) -> "Roles":
        take = lambda t: t.gather(1, index)  # noqa: E731
        return replace(
            self,
            valid=take(self.valid) & valid,
            visual=take(self.visual) & valid,
            text=take(self.text) & valid,
            orig_index=take(self.orig_index),
        )


class Policy:
    """Decides, during prefill, which visual tokens each pruning layer keeps.

    Subclasses set ``pruning_layers`` (layers on whose entry tokens may go) and ``probe_layers``
    (layers whose attention rows they summarise), and implement the three methods.
    """

    pruning_layers: tuple[int, ...] = ()
    probe_layers: tuple[int, ...] = ()
    input_layers: tuple[int, ...] = ()  # layers whose inputs on_layer_input receives (prefill, before pruning)
    head_reduce: str = "max"
    probe_chunk: int | None = None  # query rows per chunk of the attention probe (None: the device's default)
    fuse_probe: bool = False
    """Whether a probed SDPA prefill layer computes its attention from the probe's softmax rows
    (:func:`runtime.attention.attention_with_row_sums`: one ``QKᵀ`` instead of two, output equal to
    SDPA's to float rounding) rather than the stock kernel plus a separate probe."""

    def __deepcopy__(self, memo: dict) -> "Policy":
        return self  # shared, like the handle: a deep-copied model is cleaned of its hooks afterwards

    def attach(self, model: torch.nn.Module) -> list:
        """Install extra hooks on ``model`` (e.g. on the vision encoder); return their handles.

        Called once when the :class:`PruningHandle` installs; the handles are removed with it.
        """
        return []

    def begin(self, roles: Roles) -> None:
        """Called at the start of each prefill with the unpruned roles."""

    def on_inputs(self, embeds: torch.Tensor, roles: Roles) -> None:
        """Receive the (B, L, D) language-model input embeddings of a prefill, after :meth:`begin`.

        They are the hidden states entering layer 0: at image positions, the projected features.
        """

    def row_groups(self, layer: int, roles: Roles) -> torch.Tensor:
        """(B, G, L) weights of the query rows to summarise at ``layer``."""
        raise NotImplementedError

    def on_probe(self, layer: int, sums: torch.Tensor, roles: Roles) -> None:
        """Receive (B, G, L) attention row sums of ``layer`` for the current sequence."""

    def on_attention(self, layer: int, query: torch.Tensor, key: torch.Tensor, mask: Any, scaling: float, roles: Roles) -> bool:
        """A probed layer's post-RoPE queries and keys; return True to skip the row sums (default False)."""
        return False

    def on_layer_input(self, layer: int, module: torch.nn.Module, hidden: torch.Tensor, kwargs: dict, roles: Roles) -> None:
        """The hidden states and keyword arguments entering one of :attr:`input_layers` (prefill)."""

    def select(self, layer: int, roles: Roles) -> torch.Tensor:
        """(B, L) bool: the visual tokens that enter ``layer`` (a subset of ``roles.visual``)."""
        raise NotImplementedError

    def rewrite(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """The hidden states entering ``layer`` after :meth:`select`, before the kept rows are gathered.

        The default changes nothing; a pre-LLM stage that merges dropped tokens into kept ones
        (``Selection.features``) writes the kept tokens' new input embeddings here at layer 0.
        """
        return hidden

    def replay_rewrite(self, layer: int, roles: Roles, hidden: torch.Tensor) -> torch.Tensor:
        """:meth:`rewrite` while :meth:`PruningHandle.replay` forces the keep sets (default: nothing to write)."""
        return hidden


class RecipePolicy(Policy):
    """The production policy: per-layer keep counts from a recipe, top-k by the recipe's scorer.

    A recipe with a pre-LLM stage also prunes on entry to layer 0 (the stage's selection); the
    in-LLM schedule then scales with each row's visual tokens *after* the stage. The scores and
    keep counts of the request in flight are per thread, so concurrent requests never mix.

    Args:
        recipe: the :class:`runtime.Recipe`.
        strict_budget: False (default): the recipe's counts, whose FLOPs meet its budget on
            average over the calibration prompts. True: every request meets the recipe's budget
            on its own (its text length, its image's token count, the scorer's probes counted):
            a request the counts would take over it gets the same schedule scaled down
            (:func:`runtime.flops.fit_keep_counts`). A number in (0, 1]: that budget instead of
            the recipe's.
    """

    _state = PerThread(dict)  # the scorer's per-request state (its scores among them)
    _keep = PerThread()
    _layout = PerThread()  # (B, 4) per row: visual tokens, other tokens, tokens before the image, text after it

    _MAX_CACHED = 4096
    # The budget counts a probe as a second QKᵀ; fused, the layer's own attention shares it (the count is an upper bound).
    fuse_probe = True

    def __init__(self, recipe: Any, strict_budget: bool | float = False) -> None:
        self.recipe = recipe
        self.budget = _strict_budget(recipe, strict_budget)
        self._shape = None  # the language model's FLOPs shape, read at attach (strict mode)
        self.scorer = SCORERS[recipe.scorer]
        in_llm = tuple(recipe.pruning_layers)
        self.probe_layers = tuple(layer - 1 for layer in in_llm) if self.scorer.attention_probe else ()
        self.input_layers = tuple(sorted({layer + offset for layer in in_llm for offset in self.scorer.input_offsets
                                          if layer + offset >= 0}))
        self._context: dict = {}
        self.stage = None
        method = (getattr(recipe, "pre_llm", None) or {}).get("method", NO_STAGE)
        if method != NO_STAGE:
            spec = recipe.pre_llm
            self.stage = PreLLMStage(method, spec.get("keep_ratio", 1.0), spec.get("params", {}))
            in_llm = (0, *in_llm)
        self.pruning_layers = in_llm
        self.head_reduce = recipe.head_reduce
        self.probe_chunk = attention.PROBE_CHUNK  # the probe's FLOPs, which the budget counts, are the same on every device
        self._counts: dict = {}  # visual tokens of a row (strict: and its layout) -> keep counts per layer

    def attach(self, model: torch.nn.Module) -> list:
        family = family_for(model)
        language_model = family.language_model(model)
        self._context = {"final_norm": getattr(language_model, "norm", None)}
        if self.budget is not None:
            self._shape = family.flops_shape(model)
        return self.stage.attach(model) if self.stage is not None else []

    def _set_counts(self, n_visual: torch.Tensor, device: torch.device) -> None:
        rows = []
        layouts = self._layout.tolist() if self.budget is not None else [None] * n_visual.shape[0]
        for n, layout in zip(n_visual.tolist(), layouts):
            key = n if layout is None else (n, *layout)
            counts = self._counts.get(key)  # one lookup: another request thread may clear the cache meanwhile
            if counts is None:
                if len(self._counts) >= self._MAX_CACHED:  # strict keys vary with every text length
                    self._counts.clear()
                planned = self.recipe.keep_counts_for(n)
                counts = torch.from_numpy(planned if layout is None else self._fit(planned, *layout))
                self._counts[key] = counts
            rows.append(counts)
        self._keep = torch.stack(rows).to(device)

    def _fit(self, counts, n_visual: int, n_other: int, n_before: int, n_text: int):
        from .flops import fit_keep_counts

        fitted, met = fit_keep_counts(self._shape, counts, n_visual, n_other, n_before, n_text, self.budget,
                                      self.recipe.pruning_layers, self.scorer.probe_macs)
        if not met:
            logger.info("recipe runtime: a prompt of %d tokens (%d visual) cannot meet the strict budget %g even with every "
                        "visual token dropped at the recipe's first cut; it runs at that floor", n_other + n_visual, n_visual,
                        self.budget)
        return fitted

    def begin(self, roles: Roles) -> None:
        self._state = {}
        if self.budget is not None:
            n_visual = roles.visual.sum(dim=1)
            n_before = roles.n_before if roles.n_before is not None else torch.zeros_like(n_visual)
            self._layout = torch.stack([n_visual, roles.valid.sum(dim=1) - n_visual, n_before, roles.text.sum(dim=1)], dim=1).cpu()
        self._set_counts(roles.n_visual_input, roles.valid.device)

    def on_inputs(self, embeds: torch.Tensor, roles: Roles) -> None:
        if self.stage is not None:
            self.stage.on_inputs(embeds)
        self.scorer.on_inputs(self._state, embeds, roles)

    def row_groups(self, layer: int, roles: Roles) -> torch.Tensor:
        return self.scorer.groups(roles.text, roles.visual)

    def on_probe(self, layer: int, sums: torch.Tensor, roles: Roles) -> None:
        self._state["scores"] = self.scorer.scores(sums, roles.text, roles.visual)

    def on_attention(self, layer: int, query: torch.Tensor, key: torch.Tensor, mask: Any, scaling: float, roles: Roles) -> bool:
        return self.scorer.on_attention(self._state, layer, query, key, mask, scaling, roles)

    def on_layer_input(self, layer: int, module: torch.nn.Module, hidden: torch.Tensor, kwargs: dict, roles: Roles) -> None:
        self.scorer.on_layer_input(self._state, layer, module, hidden, kwargs, roles, self._context)

    def select(self, layer: int, roles: Roles) -> torch.Tensor:
        if layer == 0 and self.stage is not None:
            kept = self.stage.keep(roles) & roles.visual
            self._set_counts(kept.sum(dim=1), roles.valid.device)  # the schedule is relative to survivors
            return kept
        self._state["n_keep"] = self._keep[:, layer]  # a set-valued scorer (DART) needs the count it fills
        scores = self.scorer.rank(self._state, layer, roles).to(roles.visual.device)
        return keep_top(scores, roles.visual, self._keep[:, layer])

    def rewrite(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        writes = self.stage.writes() if layer == 0 and self.stage is not None else []
        if writes:
            hidden = hidden.clone()
            for row, positions, features in writes:
                hidden[row, positions.to(hidden.device)] = features.to(hidden.device, hidden.dtype)
        return hidden

    def replay_rewrite(self, layer: int, roles: Roles, hidden: torch.Tensor) -> torch.Tensor:
        # A feature-writing stage recomputes what it writes: the same images give the same features.
        if layer != 0 or self.stage is None or not self.stage.stage.writes_features:
            return hidden
        self.stage.keep(roles)
        return self.rewrite(0, hidden)


@dataclass
class _Request:
    """State of one generate() call / forward, set at prefill and read by decode steps."""

    prompt_len: int
    roles: Roles
    kept: dict = field(default_factory=dict)  # pruning layer -> (prompt index, valid), both (B, L')
    carry: dict = field(default_factory=dict)  # kwargs that later layers must receive, whatever their kind
    kind_carry: dict = field(default_factory=dict)  # layer kind -> kwargs its layers must receive (mask, (cos, sin))
    tokens_per_layer: list = field(default_factory=list)  # (B,) real tokens entering each layer
    visual_per_layer: list = field(default_factory=list)  # (B,) visual tokens entering each layer
    kept_visual: dict = field(default_factory=dict)  # layer -> (prompt index, kept-visual mask), (B, L)
    counted_roles: Any = None  # the roles ``counts`` were taken from
    counts: tuple = ()  # ((B,) real tokens, (B,) visual tokens) of ``counted_roles``

    @property
    def selection(self) -> dict:
        """layer -> per row, the prompt positions of the visual tokens kept entering that layer."""
        return {
            layer: [index[row][mask[row]].cpu() for row in range(mask.shape[0])]
            for layer, (index, mask) in self.kept_visual.items()
        }


class PruningHandle:
    """Hooks that prune visual tokens in ``model`` per ``policy``; ``remove()`` undoes everything.

    Use as a context manager or call :meth:`remove`. Concurrent requests on one model (a server's
    request threads) are each exactly what they would be alone: everything a request's hooks
    remember between its prefill and its decode steps is kept per thread (:mod:`runtime.state`).
    ``copy.deepcopy(model)`` gives a clean, unpatched copy; apply the recipe to it if it should prune.

    Args:
        model: a stock HF VLM of a supported family (see :mod:`runtime.families`).
        policy: a :class:`Policy` or a recipe (wrapped in :class:`RecipePolicy`).
        strict_budget: with a recipe, :class:`RecipePolicy`'s option: ``True`` makes every
            request meet the recipe's budget on its own FLOPs (not only the calibration average).

    Example:
        >>> with load("recipe.safetensors").apply(model):      # doctest: +SKIP
        ...     out = model.generate(**inputs, max_new_tokens=16)
        >>> with load("recipe.safetensors").apply(model, strict_budget=True):   # doctest: +SKIP
        ...     out = model.generate(**inputs, max_new_tokens=16)       # this request within the budget
    """

    # Per request, hence per thread: the request in flight and the forward being run.
    last_request = PerThread()  # the latest pruned prefill of this thread (None if it passed through)
    _request = PerThread()
    _forward = PerThread(dict)
    _input_ids = PerThread()
    _base_kwargs = PerThread(dict)
    _replay = PerThread()

    def __init__(self, model: torch.nn.Module, policy: Any, strict_budget: bool | float = False) -> None:
        if isinstance(policy, Policy) and strict_budget is not False:
            raise ValueError("strict_budget applies to a recipe; a custom Policy decides its own keep counts")
        self.policy = policy if isinstance(policy, Policy) else RecipePolicy(policy, strict_budget)
        self.model = model
        self.family = family_for(model)
        self.language_model = self.family.language_model(model)
        self.layers = self.family.layers(model)
        self.image_token_id = self.family.image_token_id(model)
        self.kinds = self.family.layer_kinds_of(model)
        self._attention_layers = self.family.attention_layers(model)
        _check_probes(self.policy, self.kinds, self._attention_layers)
        # Per pruning layer, which layer kinds follow it up to the next cut: fixed by the recipe, so once here.
        self._segments = {layer: self._segment_kinds(layer) for layer in self.policy.pruning_layers}
        self._hooks: list = []
        self._policy_hooks: list = []
        self._probed: list = []
        self._said: set = set()
        self._config = self.language_model.config
        self._saved_impl = self._config._attn_implementation
        if getattr(model, "_recipe_runtime_handle", None) is not None:
            raise RecipeAlreadyAppliedError(
                "this model already has a pruning recipe applied; call remove() on its handle "
                "(or leave its `with` block) before applying another"
            )
        self._removed = False
        if self.policy.pruning_layers or self.policy.probe_layers:
            self._install()
        model._recipe_runtime_handle = self

    # ----------------------------------------------------------------------------- lifecycle
    def _install(self) -> None:
        if self._saved_impl not in attention.WRAPPED:
            raise RuntimeError(
                f"attention implementation {self._saved_impl!r} is not supported by the pruning runtime; "
                "load the model with attn_implementation='sdpa' or 'eager'"
            )
        self._policy_hooks = list(self.policy.attach(self.model)) + list(self.family.pruning_hooks(self.model, self._pruned_sequence))
        attention.register()
        self._config._attn_implementation = attention.WRAPPED[self._saved_impl]
        base = self.family.base_model(self.model)
        if base is not self.model:
            self._hooks.append(self.model.register_forward_pre_hook(self._on_top, with_kwargs=True))
        self._hooks.append(base.register_forward_pre_hook(self._on_base, with_kwargs=True))
        self._hooks.append(self.language_model.register_forward_pre_hook(self._on_language_model, with_kwargs=True))
        self.model.__deepcopy__ = self._deepcopy_model  # copy.deepcopy looks it up on the instance
        first = min((*self.policy.pruning_layers, *self.policy.input_layers), default=len(self.layers))
        for index in range(first, len(self.layers)):
            hook = self._make_layer_hook(index)
            self._hooks.append(self.layers[index].register_forward_pre_hook(hook, with_kwargs=True))
        rotary = getattr(self.language_model, "rotary_emb", None)
        if isinstance(rotary, torch.nn.Module):
            self._hooks.append(rotary.register_forward_hook(self._on_rotary, with_kwargs=True))
        for index in self.policy.probe_layers:
            module = self.family.attention_module(self.model, index)
            if module is None:
                self.remove()
                raise PruningUnsupportedError(
                    f"layer {index} is a {self.kinds[index]} layer with no attention to probe; a scoring probe "
                    "(the layer before each pruning layer) must sit on an attention layer: compile the recipe for this model"
                )
            attention.set_probe(module, self._make_probe(index))
            self._probed.append(module)

    def _on_rotary(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        # The unpruned (cos, sin) of each layer kind, which a pruning layer gathers for the later
        # layers of every kind (Gemma 3: local and global RoPE; one call without a kind elsewhere).
        kind = kwargs.get("layer_type", args[2] if len(args) > 2 else None)
        self._forward.setdefault("rope", {})[kind] = output

    def _segment_kinds(self, layer: int) -> dict:
        """Kind -> the first layer of that kind in ``[layer, next pruning layer)``."""
        later = [p for p in self.policy.pruning_layers if p > layer]
        end = min(later, default=len(self.layers))
        first: dict = {}
        for index in range(layer, end):
            first.setdefault(self.kinds[index], index)
        return first

    def _pruned_sequence(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(prompt index, valid)`` of the prefill in flight once a layer pruned it, else ``None``
        (what a family's :meth:`~runtime.families.Family.pruning_hooks` follow)."""
        request = self._request
        if request is None or not request.kept or not self._forward.get("prefill"):
            return None
        return request.roles.orig_index, request.roles.valid

    def remove(self) -> None:
        """Remove every hook and probe and restore the attention implementation. Idempotent.

        A second call does nothing, even after another recipe was applied to the same model.
        """
        if self._removed:  # restoring the attention implementation again would unhook a later handle
            return
        self._removed = True
        for hook in (*self._hooks, *self._policy_hooks):
            hook.remove()
        self._hooks.clear()
        self._policy_hooks.clear()
        for module in self._probed:
            attention.set_probe(module, None)
        self._probed.clear()
        self._config._attn_implementation = self._saved_impl
        if self.model.__dict__.get("__deepcopy__") == self._deepcopy_model:
            del self.model.__dict__["__deepcopy__"]
        if getattr(self.model, "_recipe_runtime_handle", None) is self:
            del self.model._recipe_runtime_handle
        self._request = None

    def __deepcopy__(self, memo: dict) -> "PruningHandle":
        return self  # a handle is a resource, not a value; see _deepcopy_model

    def _deepcopy_model(self, memo: dict) -> torch.nn.Module:
        """``copy.deepcopy(model)``: a copy of the model as it was before :meth:`apply`.

        The copy shares no state with this handle: the hooks, probes, wrappers and the wrapped
        attention implementation are taken off it, so removing this handle never leaves the copy
        patched, and applying a recipe to the copy works as on any stock model.
        """
        model = self.model
        held = {key: model.__dict__.pop(key) for key in ("__deepcopy__", "_recipe_runtime_handle") if key in model.__dict__}
        try:
            clone = copy.deepcopy(model, memo)
        finally:
            model.__dict__.update(held)
        hook_ids = {hook.id for hook in (*self._hooks, *self._policy_hooks) if hasattr(hook, "id")}
        wrappers = [(hook.name, hook.wrapper) for hook in self._policy_hooks if hasattr(hook, "wrapper")]
        for module in clone.modules():
            for hooks in (module._forward_pre_hooks, module._forward_pre_hooks_with_kwargs,
                          module._forward_hooks, module._forward_hooks_with_kwargs):
                for hook_id in hook_ids & set(hooks):
                    del hooks[hook_id]
            for name, wrapper in wrappers:
                if module.__dict__.get(name) is wrapper:
                    del module.__dict__[name]
        self.family.language_model(clone).config._attn_implementation = self._saved_impl
        return clone

    def __enter__(self) -> "PruningHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    @contextlib.contextmanager
    def replay(self, selection: dict) -> Iterator[None]:
        """Force the keep sets of an earlier request (``handle.last_request.selection``).

        Used to check that cached generation equals a no-cache recomputation with the same tokens.
        """
        self._replay = selection
        try:
            yield
        finally:
            self._replay = None

    def _say_once(self, reason: str, consequence: str = "passing the request through unpruned") -> None:
        if reason not in self._said:
            self._said.add(reason)
            logger.info("recipe runtime: %s; %s", reason, consequence)

    # ----------------------------------------------------------------------------- hooks
    def _on_top(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if kwargs.get("labels") is not None:
            raise PruningUnsupportedError(
                "labels were passed to a model with a pruning recipe applied: pruning drops visual tokens, so the "
                "sequence no longer lines up with the labels; to train or compute a loss, run the unpatched model "
                "(handle.remove(), or outside the handle's with-block)"
            )

    def _on_base(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self._input_ids = kwargs.get("input_ids", args[0] if args else None)
        self._base_kwargs = kwargs  # image_sizes, grids…: what a family needs to find visual tokens

    def _on_language_model(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        embeds = kwargs.get("inputs_embeds")
        mask = kwargs.get("attention_mask")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers 5.24 renamed it "cache"
        ids, self._input_ids = self._input_ids, None
        base_kwargs, self._base_kwargs = self._base_kwargs, {}
        mask = self.family.padding_mask(mask, base_kwargs)
        self._forward = {"mask": mask, "cache": cache, "base_kwargs": base_kwargs, "rope": {}}
        if embeds is None:
            return
        if cache is not None and cache.get_seq_length() > 0:
            self._forward["prefill"] = False
            if embeds.shape[1] > 1:
                self._on_continuation(ids, embeds)
            if self._request is not None:
                self._request.carry = {}  # decode rows keep their own positions; only masks change
                self._request.kind_carry = {}
            return
        self._forward["prefill"] = True
        self._request = None
        self.last_request = None
        if ids is None or ids.shape[:2] != embeds.shape[:2]:
            return self._say_once("no input_ids reached the model, so image tokens cannot be located")
        if cache is not None and not _grows_per_layer(cache):
            return self._say_once(
                f"a {type(cache).__name__} has fixed-size layers that cannot hold the shorter sequences of "
                "pruned layers (use the default dynamic cache to prune)"
            )
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2):
            return self._say_once("a pre-built 4D attention mask is not supported")
        visual = self.family.prunable_visual_tokens(self.model, ids, base_kwargs)
        if not bool(visual.any()):
            return self._say_once("the prompt has no image tokens")
        valid = mask.bool() if mask is not None else torch.ones_like(visual)
        visual = visual & valid
        position = torch.arange(visual.shape[1], device=visual.device).expand_as(visual)
        image = (visual | (ids == self.image_token_id)) & valid  # protected placeholders (NeXT newlines) are not text
        last_visual = torch.where(image, position, torch.full_like(position, -1)).amax(dim=1, keepdim=True)
        if bool(((visual.sum(dim=1) > 0) & ~(valid & (position > last_visual)).any(dim=1)).any()):
            # e.g. the first chunk of a chunked prefill that splits an image: no text to rank by.
            return self._say_once("the prompt ends with image tokens, so no text follows them to rank them by "
                                  "(a chunked prefill that splits an image?)")
        first_image = torch.where(image, position, torch.full_like(position, visual.shape[1])).amin(dim=1, keepdim=True)
        roles = Roles(
            valid=valid,
            visual=visual,
            text=valid & (position > last_visual),
            orig_index=position,
            n_visual_input=visual.sum(dim=1),
            n_before=(valid & (position < first_image)).sum(dim=1),
        )
        self._request = _Request(prompt_len=visual.shape[1], roles=roles)
        self.policy.begin(roles)
        self.policy.on_inputs(embeds, roles)

    def _on_continuation(self, ids: torch.Tensor | None, embeds: torch.Tensor) -> None:
        """Several tokens fed onto a non-empty cache: a later prefill chunk, a follow-up turn, assisted decoding.

        They run like decode steps: each attends to what its layer's cache holds (the kept visual
        tokens of a pruned prompt), so the result equals recomputing the whole sequence with that
        keep set. Image tokens among them cannot be pruned any more: their layers already ran.
        """
        if ids is not None and ids.shape[:2] == embeds.shape[:2] and bool((ids == self.image_token_id).any()):
            self._say_once(
                "image tokens arrived after the prefill forward (a chunked prefill or a reused cache)",
                "they run unpruned; pass the whole prompt in one forward to prune them",
            )
        elif self._request is not None:
            self._say_once(
                "tokens were fed onto a pruned prompt's cache (a chunked prefill, a follow-up turn or assisted "
                "decoding)",
                "they attend to the visual tokens kept at the prefill, which were ranked by the text it held",
            )

    def _make_probe(self, layer: int):
        def probe(module, query, key, attention_mask, scaling, value=None):
            request = self._request
            if request is None or not self._forward.get("prefill") or query.shape[2] != request.roles.valid.shape[1]:
                return None
            roles = request.roles
            if self.policy.on_attention(layer, query, key, attention_mask, scaling, roles):
                return None
            weights = self.policy.row_groups(layer, roles).to(query.device)
            output = None
            probe_dtype = getattr(self.policy, "probe_dtype", None)  # a calibration policy may ask for the model's
            if value is not None and self.policy.fuse_probe and probe_dtype != "model":
                output, sums = attention.attention_with_row_sums(query, key, value, attention_mask, scaling, weights,
                                                                 self.policy.head_reduce, chunk=self.policy.probe_chunk)
            else:
                sums = attention.attention_row_sums(query, key, attention_mask, scaling, weights, self.policy.head_reduce,
                                                    chunk=self.policy.probe_chunk,
                                                    dtype=query.dtype if probe_dtype == "model" else None)
            self.policy.on_probe(layer, sums.to(roles.valid.device), roles)  # layers may sit on other devices
            return output

        return probe

    def _make_layer_hook(self, layer: int):
        kind = self.kinds[layer]
        is_pruning = layer in set(self.policy.pruning_layers)
        is_input = layer in set(self.policy.input_layers)
        before_pruning = layer < min(self.policy.pruning_layers, default=len(self.layers))

        def hook(module, args, kwargs):
            request = self._request
            if request is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            if is_input and self._forward["prefill"] and hidden.shape[1] == request.roles.valid.shape[1]:
                self.policy.on_layer_input(layer, module, hidden, {**kwargs, **request.carry, **request.kind_carry.get(kind, {})},
                                          request.roles)
            if before_pruning:  # runs unpruned: nothing to carry or count yet
                return None
            if is_pruning:
                if self._forward["prefill"]:
                    try:
                        hidden = self._prune(layer, request, hidden, kwargs)
                    except StageCannotRun as exc:
                        if request.kept:  # an earlier layer already pruned: the request cannot be undone
                            raise
                        self._request = None
                        self._say_once(str(exc))
                        return None
                for other, first in self._segments[layer].items():
                    masks = request.kind_carry.setdefault(other, {})
                    masks["attention_mask"] = self._rebuild_mask(layer, first, other, request, hidden)
            elif self._forward["prefill"]:
                self._count(request)
            kwargs.update(request.carry)
            kwargs.update(request.kind_carry.get(kind, {}))
            if args:
                return (hidden,) + tuple(args[1:]), kwargs
            kwargs["hidden_states"] = hidden
            return args, kwargs

        return hook

    # ----------------------------------------------------------------------------- prefill
    @staticmethod
    def _counts(request: _Request) -> tuple:
        """((B,) real tokens, (B,) visual tokens) of the request's current roles."""
        # The roles change only at pruning layers: the counts of the layers between are the same tensors.
        if request.counted_roles is not request.roles:
            request.counted_roles = request.roles
            request.counts = (request.roles.valid.sum(dim=1), request.roles.visual.sum(dim=1))
        return request.counts

    def _count(self, request: _Request) -> None:
        tokens, visual = self._counts(request)
        request.tokens_per_layer.append(tokens)
        request.visual_per_layer.append(visual)

    def _prune(self, layer: int, request: _Request, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        roles = request.roles
        if not request.tokens_per_layer:  # layers before the first pruning layer run unpruned
            tokens, visual = self._counts(request)
            request.tokens_per_layer, request.visual_per_layer = [tokens] * layer, [visual] * layer
        if self._replay is not None and layer in self._replay:
            wanted = self._replay[layer]
            kept_visual = torch.zeros_like(roles.visual)
            for row, positions in enumerate(wanted):
                kept_visual[row] = torch.isin(roles.orig_index[row], positions.to(roles.orig_index.device))
            kept_visual &= roles.visual
            hidden = self.policy.replay_rewrite(layer, roles, hidden)
        else:
            kept_visual = self.policy.select(layer, roles) & roles.visual
            hidden = self.policy.rewrite(layer, hidden)
        request.kept_visual[layer] = (roles.orig_index, kept_visual)
        keep = (roles.valid & ~roles.visual) | kept_visual

        # Kept positions in order, each row left re-padded with masked dummies to the longest row.
        lengths = keep.sum(dim=1)
        width = int(lengths.max())
        order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :width]  # kept first, in order
        shift = width - lengths
        slot = torch.arange(width, device=keep.device).expand(keep.shape[0], -1)
        valid = slot >= shift[:, None]
        index = torch.where(valid, order.gather(1, (slot - shift[:, None]).clamp(min=0)), torch.zeros_like(slot))

        batch = hidden.shape[0]
        hidden = hidden.gather(1, index.to(hidden.device)[..., None].expand(-1, -1, hidden.shape[-1]))
        gather_rows = lambda t: t.expand(batch, *t.shape[1:]).gather(1, index.to(t.device)[..., None].expand(-1, -1, t.shape[-1]))  # noqa: E731
        rope = self._forward.get("rope", {})
        for other in dict.fromkeys(self.kinds[layer:]):
            current = request.kind_carry.get(other, {}).get("position_embeddings")
            if current is None and other == self.kinds[layer]:  # not pruned yet: what this layer was given
                current = kwargs.get("position_embeddings")
            if current is None:  # another kind's, as the language model computed it (one RoPE: the layer's own)
                current = rope[other] if other in rope else kwargs.get("position_embeddings")
            if current is not None:
                cos, sin = current
                request.kind_carry.setdefault(other, {})["position_embeddings"] = (gather_rows(cos), gather_rows(sin))
        position_ids = request.carry.get("position_ids", kwargs.get("position_ids"))
        if position_ids is not None:
            request.carry["position_ids"] = position_ids.expand(batch, -1).gather(1, index.to(position_ids.device))
        request.roles = roles.gather(index, valid)
        request.kept[layer] = (request.roles.orig_index, valid)
        self._count(request)
        self.last_request = request
        return hidden

    def _rebuild_mask(self, layer: int, first: int, kind: str, request: _Request, hidden: torch.Tensor) -> Any:
        """The mask of the ``kind`` layers pruned at ``layer``, sized against their first one, ``first``.

        A linear-attention layer holds no per-token KV, so the tokens after the prompt are counted
        in the first attention layer from ``layer`` on.
        """
        mask2d, cache = self._forward["mask"], self._forward["cache"]
        prompt = request.prompt_len
        orig_index, valid = request.kept[layer]
        if mask2d is None:  # no padding anywhere: the prompt part is the dummy mask, new tokens are real
            # Tokens after the prompt, this forward's included, from that layer's own cache (it holds
            # the pruned prompt): layer 0's length is wrong when layer 0 itself prunes (a pre-LLM stage).
            sized = first if first in self._attention_layers else next((i for i in self._attention_layers if i >= layer), None)
            new = 0 if self._forward["prefill"] or sized is None else cache.get_seq_length(sized) - valid.shape[1] + hidden.shape[1]
            tail = torch.ones(valid.shape[0], new, dtype=torch.bool, device=valid.device)
            pruned = torch.cat([valid, tail], dim=1)
        else:
            head = mask2d[:, :prompt].bool().gather(1, orig_index.to(mask2d.device)) & valid.to(mask2d.device)
            pruned = torch.cat([head, mask2d[:, prompt:].bool()], dim=1)
        return self.family.layer_mask(self.model, kind, self._config, hidden, pruned.to(hidden.device), cache, first,
                                      orig_index, bool(self._forward["prefill"]), self._forward.get("base_kwargs", {}))


def _strict_budget(recipe: Any, strict_budget: Any) -> float | None:
    """The per-request budget ``strict_budget`` asks for (None: off); ValueError names a bad value."""
    if strict_budget is False or strict_budget is None:
        return None
    if strict_budget is True:
        budget = (getattr(recipe, "provenance", None) or {}).get("budget")
        if budget is None and not recipe.pruning_layers:  # nothing to scale (keep-all, a stage alone)
            return None
        if budget is None:
            raise ValueError("strict_budget=True needs the recipe's budget, and this recipe records none "
                             "(provenance 'budget'); pass the budget itself, e.g. strict_budget=0.45")
        return float(budget)
    if isinstance(strict_budget, bool) or not isinstance(strict_budget, (int, float)) or not 0 < strict_budget <= 1:
        raise ValueError(f"strict_budget={strict_budget!r} is invalid; pass True (the recipe's budget), False, "
                         "or a FLOPs fraction in (0, 1]")
    return float(strict_budget)


def _check_probes(policy: Policy, kinds: tuple, attention_layers: tuple) -> None:
    """Refuse a policy that would read attention rows of a layer that has none (e.g. linear attention)."""
    allowed = set(attention_layers)
    for layer in policy.probe_layers:
        if layer not in allowed:
            cuts = ", ".join(str(i + 1) for i in attention_layers if i + 1 < len(kinds))
            raise RecipeMismatchError(
                f"the recipe prunes on entry to layer {layer + 1}, whose scores come from layer {layer}, a {kinds[layer]} "
                f"layer with no attention rows to rank visual tokens by; on this model a scoring cut may only enter "
                f"layers {cuts} (after a full-attention layer): recompile the recipe for this model"
            )


def _grows_per_layer(cache: Any) -> bool:
    """Whether every layer of ``cache`` grows by what it is given (a plain DynamicCache).

    Pruned layers store fewer tokens than unpruned ones; fixed-size (static) or quantised layers
    would misplace them or mask the wrong slots. A dynamic sliding-window layer qualifies: it keeps
    the last ``window − 1`` of what *it* was given and sizes its masks from its own count, exactly as
    when the model runs on the pruned prompt.
    """
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer, LinearAttentionLayer

    # A linear-attention layer keeps a fixed-size conv and recurrent state and no per-token KV: after a
    # pruned prefill it holds the state of the pruned sequence, which is what the model computes on it.
    return all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer, LinearAttentionLayer) for layer in getattr(cache, "layers", ()))

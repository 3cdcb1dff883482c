"""The lmms-eval model class behind the ``recipe_llava`` plugin (see :mod:`recipe_compiler.lmms_plugin`).

Importing this module needs lmms-eval installed.
"""
from __future__ import annotations

from typing import Any

import torch
from lmms_eval.api.model import lmms
from loguru import logger  # an lmms-eval dependency: its log stream

from .models import load_model, parse_dtype
from .tokenizer import IMAGE_TOKEN


def _flag(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes", "on")


class RecipeLlava(lmms):
    """A registry/hub/local VLM with a pruning recipe applied by ``runtime`` hooks."""

    is_simple = True

    def __init__(self, pretrained: str = "tiny-llava", recipe: str | None = None, device: str = "cpu", dtype: str = "float32",
                 attn_implementation: str = "sdpa", random_weights: Any = False, seed: Any = 0, max_new_tokens: Any = 32,
                 batch_size: Any = 1, **kwargs: Any) -> None:
        super().__init__()
        if kwargs:
            raise TypeError(f"recipe_llava: unknown model_args {sorted(kwargs)}")
        from runtime.presets import resolve

        self.recipe = resolve(recipe) if recipe not in (None, "", "none") else None
        self.loaded = load_model(str(pretrained), random_weights=_flag(random_weights), device=device, dtype=parse_dtype(dtype),
                                 attn_implementation=attn_implementation, seed=int(seed))
        self.handle = self.recipe.apply(self.loaded.model) if self.recipe is not None else None
        self.max_new_tokens = int(max_new_tokens)
        self.batch_size_per_gpu = int(batch_size)
        self._device = torch.device(device)
        self._rank, self._world_size = 0, 1
        self._reported = False

    @property
    def model(self):
        return self.loaded.model

    def _generate(self, context: str, image: Any, gen_kwargs: dict) -> str:
        processor, model = self.loaded.processor, self.loaded.model
        prompt = self.loaded.format_prompt(context.replace(IMAGE_TOKEN, "").strip())
        inputs = processor(images=[image.convert("RGB")], text=[prompt], return_tensors="pt").to(self._device)
        inputs["pixel_values"] = inputs["pixel_values"].to(next(model.parameters()).dtype)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=int(gen_kwargs.get("max_new_tokens", self.max_new_tokens)),
                                 do_sample=False, num_beams=1)
        request = self.handle.last_request if self.handle is not None else None
        if request is not None and not self._reported:  # say once what the recipe did, so a log shows pruning really ran
            visual = [int(v[0]) for v in request.visual_per_layer]
            logger.info(f"recipe_llava: pruning active; visual tokens entering each layer {visual}")
            self._reported = True
        text = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        until = gen_kwargs.get("until") or []
        for stop in [until] if isinstance(until, str) else until:
            if stop:
                text = text.split(stop)[0]
        return text

    def generate_until(self, requests) -> list[str]:
        answers = []
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            visuals = doc_to_visual(self.task_dict[task][split][doc_id])
            if len(visuals) != 1:
                raise ValueError(f"recipe_llava answers one image per question; {task} doc {doc_id} has {len(visuals)}")
            answers.append(self._generate(context, visuals[0], dict(gen_kwargs)))
        return answers

    def loglikelihood(self, requests):
        raise NotImplementedError("recipe_llava supports generate_until tasks only")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("recipe_llava supports generate_until tasks only")

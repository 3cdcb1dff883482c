"""Tiny checkpoints, recipes and HF-runtime reference tokens for the vLLM plugin tests.

Runs in the project's main environment (transformers 5.23), never in the vLLM one: the vLLM tests
call it in a subprocess (``python tests/vllm/tiny.py build DIR`` and ``… reference SPEC.json``), so
the reference is the HF runtime exactly as users run it.

The tiny models differ from the built-in ``tiny-llava`` / ``tiny-llava-next`` only where vLLM's CPU
backend needs it: head sizes 32 (the CPU attention backend accepts 32, 64, 80, …) and checkpoint
keys in the llava-hf layout (``vision_tower.vision_model.*``, ``language_model.model.*``), which
both vLLM's weight mapper and transformers 5.23 load. The weights are random with a larger init
than HF's default, so greedy tokens depend on the prompt and the kept image tokens.
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

# Chat template for the OpenAI-server test (LLaVA-1.5 style): one "<image>" per image part.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' or part['type'] == 'image_url' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% else %}ASSISTANT: {{ message['content'] }}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)

_VISION = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 2,
           "patch_size": 4, "projection_dim": 64, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-05,
           "model_type": "clip_vision_model", "initializer_factor": 4.0}
_TEXT = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "max_position_embeddings": 2048,
         "rms_norm_eps": 1e-05, "vocab_size": 261, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 260,
         "tie_word_embeddings": False, "initializer_range": 0.25}

FAMILIES = {
    "llava": {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "image_token_index": 259,
        "pad_token_id": 260, "projector_hidden_act": "gelu", "tie_word_embeddings": False,
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
        "vision_config": {**_VISION, "image_size": 48}, "text_config": dict(_TEXT),
    },
    "llava_next": {
        "architectures": ["LlavaNextForConditionalGeneration"], "model_type": "llava_next",
        "image_grid_pinpoints": [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]], "image_token_index": 259,
        "pad_token_id": 260, "projector_hidden_act": "gelu", "tie_word_embeddings": False,
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
        "vision_config": {**_VISION, "image_size": 32}, "text_config": dict(_TEXT),
    },
}
# Image sizes (width, height) per family: LLaVA-NeXT's cover three anyres layouts (wide, tall, square).
IMAGE_SIZES = {"llava": [(48, 48), (48, 48), (48, 48)], "llava_next": [(64, 32), (32, 80), (64, 64)]}
STAGES = {"g-prune": 0.25, "fopru-rank": 0.25, "fopru-row": 0.375}
PROMPTS = ["What is in the picture?", "Describe it.", "Count the shapes."]


def _config(family: str):
    from transformers import AutoConfig

    spec = copy.deepcopy(FAMILIES[family])
    return AutoConfig.for_model(spec.pop("model_type"), **spec)


def _images(family: str) -> list:
    import numpy as np
    from PIL import Image

    out = []
    for i, (w, h) in enumerate(IMAGE_SIZES[family]):
        rng = np.random.default_rng(100 + i)
        base = rng.integers(0, 256, size=(h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        big = np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))[:h, :w]  # blocky: real structure to rank
        noise = rng.integers(0, 40, size=big.shape, dtype=np.uint8)
        out.append(Image.fromarray(np.clip(big.astype(int) + noise, 0, 255).astype(np.uint8)))
    return out


def build(out: Path) -> dict:
    """Save each tiny family (checkpoint, tokenizer, processor), its images and one recipe per stage."""
    import torch
    from recipe_compiler.families import family_of
    from recipe_compiler.models import _random_model
    from runtime import Recipe
    from runtime.families import model_fingerprint

    manifest = {}
    for family in FAMILIES:
        directory = out / family
        directory.mkdir(parents=True, exist_ok=True)
        config = _config(family)
        model = _random_model(config, device="cpu", dtype=torch.float32, attn_implementation="sdpa", seed=0)
        _save_llava_hf(model, directory)
        processor = family_of(config).processor(config)
        processor.chat_template = CHAT_TEMPLATE
        processor.save_pretrained(directory)
        processor.tokenizer.save_pretrained(directory)
        images = []
        for i, image in enumerate(_images(family)):
            path = directory / f"image{i}.png"
            image.save(path)
            images.append(str(path))
        fingerprint = model_fingerprint(model)
        recipe_dir = out / f"{family}-recipes"  # not beside the weights: vLLM loads every *.safetensors there
        recipe_dir.mkdir(exist_ok=True)
        recipes = {}
        for stage, ratio in STAGES.items():
            recipe = Recipe.keep_all(fingerprint, pre_llm={"method": stage, "keep_ratio": ratio, "params": {}})
            path = recipe_dir / f"{stage}.safetensors"
            recipe.save(path)
            recipes[stage] = str(path)
        # A recipe with an in-LLM schedule too (served with its stage only) and one for another model.
        counts = [fingerprint["visual_tokens"]] * 2 + [fingerprint["visual_tokens"] // 2] * (fingerprint["num_layers"] - 2)
        Recipe(keep_count=counts, scorer="fitprune", fingerprint=fingerprint,
               pre_llm={"method": "g-prune", "keep_ratio": 0.5, "params": {}}).save(recipe_dir / "stage-and-schedule.safetensors")
        foreign = dict(fingerprint, hidden_size=fingerprint["hidden_size"] * 2, config_hash="0" * 16)
        Recipe.keep_all(foreign, pre_llm={"method": "g-prune", "keep_ratio": 0.5, "params": {}}).save(recipe_dir / "foreign.safetensors")
        Recipe.keep_all(fingerprint).save(recipe_dir / "no-stage.safetensors")
        manifest[family] = {"dir": str(directory), "recipe_dir": str(recipe_dir), "images": images, "recipes": recipes, "fingerprint": fingerprint}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


# The bench's CPU model: LLaVA-1.5's 576 visual tokens per 336-px image and a 12x768 Llama (head size 64),
# with a small CLIP tower so the language model, where pruning acts, dominates prefill.
MID_LLAVA = copy.deepcopy(FAMILIES["llava"])
MID_LLAVA["vision_config"].update(image_size=336, patch_size=14)
MID_LLAVA["text_config"].update(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                                num_key_value_heads=12, head_dim=64, initializer_range=0.02)


def bench_model(name: str, out: Path, stage: str, ratio: float) -> dict:
    """A model directory and a stage-only recipe for ``bench/vllm.py``.

    ``name``: ``tiny`` (the tests' LLaVA), ``mid`` (:data:`MID_LLAVA`), both with random weights saved
    in the llava-hf layout; or a registry alias (e.g. ``llava-1.5-7b``): its embedded config, the
    built-in processor and **no weights** (vLLM's ``load_format="dummy"`` fills them at random), for
    a real-size run on a GPU.
    """
    import torch

    from recipe_compiler.families import config_from_dict, family_of
    from recipe_compiler.models import REGISTRY, _random_model
    from runtime import Recipe
    from runtime.families import model_fingerprint

    out.mkdir(parents=True, exist_ok=True)
    if name in ("tiny", "mid"):
        spec = copy.deepcopy(FAMILIES["llava"] if name == "tiny" else MID_LLAVA)
        config = _config_from(spec)
        model = _random_model(config, device="cpu", dtype=torch.float32, attn_implementation="sdpa", seed=0)
        _save_llava_hf(model, out)
        weights = True
    else:
        config = config_from_dict(REGISTRY[name].config)
        model = _random_model(config, device="meta", dtype=torch.float32, attn_implementation="sdpa", seed=0)
        config.save_pretrained(out)
        weights = False
    processor = family_of(config).processor(config)
    processor.chat_template = CHAT_TEMPLATE
    processor.save_pretrained(out)
    processor.tokenizer.save_pretrained(out)
    recipe = Recipe.keep_all(model_fingerprint(model), pre_llm={"method": stage, "keep_ratio": ratio, "params": {}})
    recipe_path = out.parent / f"{out.name}-{stage}-{ratio}.safetensors"
    recipe.save(recipe_path)
    vision = config.vision_config
    return {"dir": str(out), "recipe": str(recipe_path), "weights": weights, "model_type": config.model_type, "image_size": int(vision.image_size),
            "visual_tokens": (int(vision.image_size) // int(vision.patch_size)) ** 2,
            "text": {k: getattr(config.text_config, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads")}}


def _config_from(spec: dict):
    from transformers import AutoConfig

    spec = copy.deepcopy(spec)
    return AutoConfig.for_model(spec.pop("model_type"), **spec)


def _save_llava_hf(model, directory: Path) -> None:
    """save_pretrained, then the checkpoint keys in the llava-hf layout (what vLLM's weight mapper expects)."""
    from safetensors.torch import load_file, save_file

    model.save_pretrained(directory)
    weights = load_file(directory / "model.safetensors")
    renamed = {}
    for key, value in weights.items():
        for old, new in (("model.vision_tower.", "vision_tower."), ("model.language_model.", "language_model.model."),
                         ("model.multi_modal_projector.", "multi_modal_projector."), ("model.image_newline", "image_newline"),
                         ("lm_head.", "language_model.lm_head.")):
            if key.startswith(old):
                key = new + key[len(old):]
        if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
            key = "vision_tower.vision_model." + key[len("vision_tower."):]
        renamed[key] = value.contiguous()
    save_file(renamed, directory / "model.safetensors", metadata={"format": "pt"})


def prompt_text(prompt: str, n_images: int = 1) -> str:
    """The LLaVA-1.5 prompt both runtimes get (vLLM expands each <image> itself)."""
    return "USER: " + "<image>\n" * n_images + prompt + " ASSISTANT:"


def reference(spec: dict) -> list[dict]:
    """HF runtime greedy generation for each request, one at a time (batch 1, as users call it).

    spec: {"model_dir", "recipe" (path or null for unpruned), "max_tokens", "requests": [{"prompt", "image"}]}.
    Returns per request: prompt token count entering the LM, token ids, their log-probabilities.
    """
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from runtime import load

    model = AutoModelForImageTextToText.from_pretrained(spec["model_dir"], dtype=torch.float32, attn_implementation="sdpa").eval()
    processor = AutoProcessor.from_pretrained(spec["model_dir"])
    handle = load(spec["recipe"]).apply(model) if spec.get("recipe") else None
    out = []
    for request in spec["requests"]:
        image = Image.open(request["image"]).convert("RGB")
        inputs = processor(images=[image], text=[prompt_text(request["prompt"])], return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(**inputs, max_new_tokens=spec["max_tokens"], do_sample=False,
                                 output_scores=True, return_dict_in_generate=True)
        new = gen.sequences[0, inputs["input_ids"].shape[1]:]
        logprobs = [float(torch.log_softmax(s[0].float(), -1)[t]) for s, t in zip(gen.scores, new)]
        kept = None
        if handle is not None and handle.last_request is not None:
            kept = int(handle.last_request.tokens_per_layer[0][0])
        out.append({"tokens": new.tolist(), "logprobs": logprobs, "prompt_tokens": kept if kept is not None else int(inputs["input_ids"].shape[1])})
    if handle is not None:
        handle.remove()
    return out


if __name__ == "__main__":
    command, arg = sys.argv[1], Path(sys.argv[2])
    if command == "build":
        print(json.dumps(build(arg)))
    elif command == "reference":  # a list of specs: one process, one import of transformers
        print(json.dumps([reference(spec) for spec in json.loads(arg.read_text())]))
    elif command == "bench-model":  # NAME OUT STAGE RATIO
        print(json.dumps(bench_model(sys.argv[3], arg, sys.argv[4], float(sys.argv[5]))))
    else:
        raise SystemExit(f"unknown command {command!r}; use build, reference or bench-model")

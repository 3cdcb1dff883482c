"""The testbed model's architecture (data) and the packed forward used to train and evaluate it.

``LlavaForConditionalGeneration`` (the LLaVA-1.5 layout): a CLIP ViT (3 x 128, 224 px, patch 14, so
256 visual tokens per image after the CLS token is dropped), a two-layer GELU projector and a Llama
LM (8 x 128, GQA 4/2 heads, SwiGLU 384) over the word-level vocabulary of :mod:`.vocab`.

Packing: all questions about one image follow one image prefix ``<s> USER : <image>x256``. Each
question block attends to the prefix and to itself only (a block-causal 4D mask) and its position
ids restart where the prefix ends, so every block sees exactly what the one-question prompt
``USER: <image>\\n<question> ASSISTANT:`` sees (checked by the tests).
"""
from __future__ import annotations

from typing import Any, Sequence

from .task import GRID, IMAGE_SIZE, PATCH
from .vocab import BOS_ID, EOS_ID, IMAGE_ID, PAD_ID, VOCAB_SIZE

N_VISUAL = GRID * GRID

CONFIG: dict[str, Any] = {
    "architectures": ["LlavaForConditionalGeneration"],
    "model_type": "llava",
    "image_seq_length": N_VISUAL,
    "image_token_index": IMAGE_ID,
    "pad_token_id": PAD_ID,
    "projector_hidden_act": "gelu",
    "tie_word_embeddings": False,
    "vision_feature_layer": -1,
    "vision_feature_select_strategy": "default",
    "vision_config": {
        "model_type": "clip_vision_model",
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH,
        "projection_dim": 128,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-05,
    },
    "text_config": {
        "model_type": "llama",
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 8,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-05,
        "vocab_size": VOCAB_SIZE,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "tie_word_embeddings": False,
    },
}
"""The testbed's ``config.json`` (also the ``testbed-llava`` registry entry)."""


def build_model(seed: int = 0):
    """A freshly initialised testbed model (float32, eval mode off)."""
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    config = LlavaConfig(**{k: v for k, v in CONFIG.items() if k not in ("architectures", "model_type")})
    config._attn_implementation = "sdpa"
    return LlavaForConditionalGeneration(config)


def pixel_tensor(images: Sequence[Any]):
    """CLIP-normalised ``[B, 3, 224, 224]`` float32 from 224 x 224 RGB pictures (what the processor
    gives for them: its resize and centre crop are identities at this size)."""
    import numpy as np
    import torch

    from ..families.base import CLIP_MEAN, CLIP_STD

    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images]) / np.float32(255.0)
    arr = (arr - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2)))


def image_features(model, pixel_values):
    """Projector outputs ``[B, 256, D]``."""
    out = model.model.get_image_features(pixel_values=pixel_values)
    feats = getattr(out, "pooler_output", out)
    if isinstance(feats, (list, tuple)):
        import torch

        feats = torch.stack(list(feats))
    return feats.reshape(pixel_values.shape[0], N_VISUAL, -1)


def question_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of one question block ``<prompt> ASSISTANT :`` (no BOS)."""
    return tokenizer(f"{prompt} ASSISTANT:", add_special_tokens=False).input_ids


PREFIX_TEXT_IDS_LEN = 3  # <s> USER :


def pack(tokenizer, questions: Sequence[Sequence[tuple[str, str]]], *, with_image: bool = True, hide=None):
    """Packed inputs for a batch of images, each with its ``(prompt, answer)`` list.

    Returns:
        dict with ``input_ids`` [B, L] (image placeholders included when ``with_image``),
        ``position_ids`` [B, L], ``mask`` bool [B, 1, L, L] (True = may attend; with ``hide``, a bool
        ``[B, 256]`` tensor, the question blocks do not see the visual tokens it marks), ``targets`` [B, L]
        (-100 except at the ``:`` before each answer, whose target is the answer's first token,
        and at the answer, whose target is ``</s>``), ``answer_pos`` list of (b, position, answer id).
    """
    import torch

    prefix = tokenizer("USER: <image>").input_ids  # <s> USER : <image>
    assert prefix[0] == BOS_ID and prefix[-1] == IMAGE_ID, prefix
    prefix = prefix[:-1] + ([IMAGE_ID] * N_VISUAL if with_image else [])
    rows, blocks_of, targets_of, answers = [], [], [], []
    for b, qs in enumerate(questions):
        ids, block, tgt = list(prefix), [0] * len(prefix), [-100] * len(prefix)
        for k, (prompt, answer) in enumerate(qs, start=1):
            q = question_ids(tokenizer, prompt)
            a = tokenizer(answer, add_special_tokens=False).input_ids
            seq = q + a
            t = [-100] * (len(q) - 1) + a + [EOS_ID]
            answers.append((b, len(ids) + len(q) - 1, a[0]))
            ids += seq
            block += [k] * len(seq)
            tgt += t
        rows.append(ids)
        blocks_of.append(block)
        targets_of.append(tgt)
    L = max(len(r) for r in rows)
    B = len(rows)
    input_ids = torch.full((B, L), PAD_ID, dtype=torch.long)
    position_ids = torch.zeros((B, L), dtype=torch.long)
    targets = torch.full((B, L), -100, dtype=torch.long)
    block = torch.full((B, L), -1, dtype=torch.long)
    for b in range(B):
        n = len(rows[b])
        input_ids[b, :n] = torch.tensor(rows[b])
        targets[b, :n] = torch.tensor(targets_of[b])
        blk = torch.tensor(blocks_of[b])
        block[b, :n] = blk
        pos = torch.arange(n)
        # Positions restart after the prefix in every block.
        start = torch.zeros(n, dtype=torch.long)
        for k in range(1, int(blk.max()) + 1):
            idx = (blk == k).nonzero().flatten()
            start[idx] = idx[0] - len(prefix)
        position_ids[b, :n] = pos - start
    i = torch.arange(L)
    causal = i[None, :] <= i[:, None]
    same = (block[:, :, None] == block[:, None, :]) | (block[:, None, :] == 0)
    valid = (block >= 0)
    mask = causal[None] & same & valid[:, None, :] & valid[:, :, None]
    if hide is not None and with_image:
        start = len(prefix) - N_VISUAL
        cols = torch.zeros((B, L), dtype=torch.bool)
        cols[:, start:start + N_VISUAL] = hide
        mask &= ~((block > 0)[:, :, None] & cols[:, None, :])
    # Padding rows attend to themselves only (keeps softmax finite; they carry no loss).
    mask |= torch.eye(L, dtype=torch.bool)[None]
    return {"input_ids": input_ids, "position_ids": position_ids, "mask": mask[:, None], "targets": targets,
            "answer_pos": answers}


def packed_logits(model, packed: dict, pixel_values=None, features=None):
    """Logits ``[B, L, V]`` and projector features of a packed batch (see :func:`pack`)."""
    import torch

    ids = packed["input_ids"]
    embeds = model.get_input_embeddings()(ids)
    if (ids == IMAGE_ID).any():
        if features is None:
            features = image_features(model, pixel_values)
        img = ids == IMAGE_ID
        embeds = embeds.masked_scatter(img[..., None].expand_as(embeds), features.to(embeds.dtype))
    out = model.model.language_model(inputs_embeds=embeds, attention_mask=packed["mask"],
                                     position_ids=packed["position_ids"], use_cache=False)
    logits = model.lm_head(out.last_hidden_state)
    return logits, features

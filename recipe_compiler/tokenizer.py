"""The offline byte-level tokenizer of the built-in and random-weight models (no download, any text round-trips)."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import transformers

IMAGE_TOKEN = "<image>"
"""The image placeholder's default text (LLaVA's)."""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-unicode map (what the ByteLevel pre-tokenizer uses)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def builtin_tokenizer(
    vocab_size: int,
    image_token_id: int,
    pad_token_id: int | None = None,
    *,
    image_token: str = IMAGE_TOKEN,
    special_tokens: dict[str, int] | None = None,
    named_tokens: dict[str, str] | None = None,
) -> "transformers.PreTrainedTokenizerFast":
    """Build the offline byte-level tokenizer used by tiny-llava and random-weight models.

    Every UTF-8 byte is one token (no merges), so any text round-trips.  Special tokens are
    ``<unk>``, ``<s>`` (bos, prepended to every sequence), ``</s>`` (eos), ``<pad>`` and
    ``<image>``; ``<image>`` gets exactly ``image_token_id`` and is never split.  The remaining
    ids are laid out like Llama's: ``<unk>``, ``<s>``, ``</s>`` (and ``<pad>`` when no id is given)
    take the lowest free ids, then the 256 bytes.  Unused ids below ``vocab_size`` are filled with
    never-produced ``<extra_N>`` tokens so every id a model can emit decodes to something.
    Padding is on the left.

    Args:
        vocab_size: Size of the model's embedding table; all ids are below it.
        image_token_id: Id of ``<image>`` (e.g. 32000 for LLaVA-1.5).
        pad_token_id: Id of ``<pad>``; ``None`` puts it right after ``</s>``'s free slot.
        image_token: The image placeholder's text (``"<|image_pad|>"`` for Qwen2-VL).
        special_tokens: Further never-split tokens and their ids, e.g. Qwen's
            ``{"<|vision_start|>": 151652, ...}``.
        named_tokens: Attribute names a processor reads for some of them, e.g. Gemma 3's
            ``{"boi_token": "<start_of_image>"}`` (then ``tokenizer.boi_token`` and ``.boi_token_id``).

    Returns:
        A ``PreTrainedTokenizerFast`` with ``tokenizer.image_token == image_token``.

    Raises:
        ValueError: Ids out of range, clashing, or a vocabulary too small to hold 256 bytes and
            five special tokens.

    Example:
        >>> tok = builtin_tokenizer(261, 259, 260)
        >>> tok("hi <image>").input_ids
        [1, 107, 108, 35, 259]
        >>> tok.decode(tok("héllo").input_ids, skip_special_tokens=True)
        'héllo'
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    for label, value in (("vocab_size", vocab_size), ("image_token_id", image_token_id)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{label} must be an int, got {value!r}")
    if pad_token_id is not None and (isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int)):
        raise ValueError(f"pad_token_id must be an int or None, got {pad_token_id!r}")
    special_tokens = dict(special_tokens or {})
    needed = 256 + 5 + len(special_tokens)
    if vocab_size < needed:
        raise ValueError(f"vocab_size {vocab_size} is too small for the byte-level tokenizer; use at least {needed}")
    for label, value in (("image_token_id", image_token_id), ("pad_token_id", pad_token_id)):
        if value is not None and not 0 <= value < vocab_size:
            raise ValueError(f"{label} {value} is outside the vocabulary [0, {vocab_size}); pick an id below vocab_size")
    if pad_token_id is not None and pad_token_id == image_token_id:
        raise ValueError(f"pad_token_id and image_token_id are both {image_token_id}; give them different ids")
    fixed = [image_token_id] + ([pad_token_id] if pad_token_id is not None else [])
    for token, value in special_tokens.items():
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab_size:
            raise ValueError(f"special token {token!r} has id {value!r}, not an int in [0, {vocab_size})")
        if value in fixed:
            raise ValueError(f"special token {token!r} reuses id {value}; give every special token its own id")
        fixed.append(value)

    vocab: dict[str, int] = {image_token: image_token_id, **special_tokens}
    if pad_token_id is not None:
        vocab["<pad>"] = pad_token_id
    taken = set(vocab.values())
    free = (i for i in range(vocab_size) if i not in taken)
    for tok in ("<unk>", "<s>", "</s>"):
        vocab[tok] = next(free)
    if pad_token_id is None:
        vocab["<pad>"] = next(free)
    for byte, char in sorted(_bytes_to_unicode().items()):
        vocab[char] = next(free)
    for i in free:
        vocab[f"<extra_{i}>"] = i

    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>", "<pad>", image_token, *special_tokens)]
    )
    bos_id = vocab["<s>"]
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        padding_side="left",
        clean_up_tokenization_spaces=False,
        extra_special_tokens={"image_token": image_token, **(named_tokens or {})},
    )
    return tokenizer

"""The testbed's word-level tokenizer: a closed vocabulary (the task's words, the prompt template's
pieces, digits), whitespace + punctuation pre-tokenization, ``<image>`` and the specials as added
tokens. Built in code, so the shipped model needs only its weights.

Layout: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, ``<pad>`` 3, ``<image>`` 4, then the words (sorted).

Example:
    >>> tok = testbed_tokenizer()
    >>> tok("USER: <image>\\nwhich digit is shown ? ASSISTANT:").input_ids[:4]
    [1, ..., ..., 4]
"""
from __future__ import annotations

from functools import lru_cache

from .task import ANSWERS, PROMPT_WORDS

SPECIALS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
UNK_ID, BOS_ID, EOS_ID, PAD_ID, IMAGE_ID = range(5)
TEMPLATE_WORDS = ("USER", "ASSISTANT", ":", ".", ",", "!", "'")


def words() -> list[str]:
    """Every word of the vocabulary after the specials, in id order."""
    ws = set(PROMPT_WORDS) | set(TEMPLATE_WORDS)
    for answers in ANSWERS.values():
        ws |= set(answers)
    return sorted(ws)


VOCAB_SIZE = len(SPECIALS) + len(words())


@lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for w in words():
        vocab[w] = len(vocab)
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    # Case folding would break "USER"/"ASSISTANT"; the task's words are lower case already.
    tok.normalizer = normalizers.Sequence([normalizers.NFKC()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)])
    return tok.to_str()


def testbed_tokenizer():
    """A fresh ``PreTrainedTokenizerFast`` for the testbed vocabulary (prepends ``<s>``)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    tok.padding_side = "left"
    tok.model_max_length = 1024
    return tok

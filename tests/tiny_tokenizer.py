"""A word-level tokenizer for the tiny random models: built offline in milliseconds, adds ``<s>`` first."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
WORDS = ("the of and to in is was a on for as by with he she it at from that this his her an be were are "
         "film actor album song game city river war ship army king team season year school church music "
         "book story series station road species band party state one two three first new old had has "
         "not but which also after during been their there when who more").split()


def tiny_tokenizer(save_to: str | Path | None = None) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    if save_to is not None:
        fast.save_pretrained(save_to)
    return fast


def words(n: int, seed: int = 0) -> str:
    """``n`` in-vocabulary words, deterministic."""
    import random

    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))

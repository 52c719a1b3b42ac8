"""A byte-level BPE tokenizer trained in the test (no downloads), as transformers loads one."""

from __future__ import annotations

from typing import TypeVar

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

T = TypeVar("T", bound=PreTrainedTokenizerFast)

SPECIALS = ["<pad>", "<bos>", "<|end|>"]


def tiny_tokenizer(
    cls: type[T] = PreTrainedTokenizerFast,  # type: ignore[assignment]
    *,
    text: str = "hello world, how are you today?",
    vocab_size: int = 320,
) -> T:
    """Trained on `text`; `<pad>`, `<bos>` and `<|end|>` (EOS) are its first three ids."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator([text] * 4, trainer=trainer)
    return cls(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<bos>", eos_token="<|end|>"
    )

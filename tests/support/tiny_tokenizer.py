"""A byte-level BPE tokenizer trained in the test (no downloads), as transformers loads one."""

from __future__ import annotations

from typing import Any, TypeVar

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
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


def tiny_sentencepiece_tokenizer(text: str = "Hello world, how are you today? héllo wörld") -> Any:
    """Llama-2's kind, built from a vocabulary (no training): a word's leading space is `▁`, the
    text's first space is stripped, and a character outside the vocabulary falls back to byte
    tokens (`<0xE6>`), which decode to U+FFFD alone. `<s>` and `</s>` are ids 1 and 2."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab |= {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for c in sorted(set(text.replace(" ", "▁")) | {"▁"}):
        vocab.setdefault(c, len(vocab))
    merges = [("▁", "H"), ("e", "l"), ("el", "l"), ("▁H", "ell"), ("▁", "w"), ("o", "r")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>")
    )
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tokenizer.add_special_tokens(["<s>", "</s>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )

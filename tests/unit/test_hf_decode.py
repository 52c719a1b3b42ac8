"""HFTokenizer decodes through the Rust tokenizer where transformers adds nothing: the same text as
transformers' own decode, special tokens skipped, and transformers' path where a class changes it."""

from __future__ import annotations

import itertools

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from chatqueue.text.hf_tokenizer import HFTokenizer

TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def tiny_tokenizer(cls: type[PreTrainedTokenizerFast] = PreTrainedTokenizerFast):  # type: ignore[no-untyped-def]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<bos>", "<|end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(["héllo world, how are you today? ünïcode"] * 4, trainer=trainer)
    return cls(tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<|end|>")


def hf(tokenizer: PreTrainedTokenizerFast) -> HFTokenizer:
    return HFTokenizer(tokenizer, model_name="tiny", eos_token_ids=(), chat_template=TEMPLATE)


def test_decode_matches_transformers_with_specials_and_split_characters() -> None:
    tokenizer = tiny_tokenizer()
    ours = hf(tokenizer)
    assert ours._backend_decode is not None  # the fast path is the one under test
    ids = [1, *tokenizer.encode("héllo world, ünïcode", add_special_tokens=False), 2, 0]
    for start, stop in itertools.combinations(range(len(ids) + 1), 2):
        window = ids[start:stop]
        expected = tokenizer.decode(
            window, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        assert ours.decode(window) == expected
        assert ours.decode(tuple(window)) == expected


class Shouting(PreTrainedTokenizerFast):
    def _decode(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return super()._decode(*args, **kwargs).upper()


def test_a_class_that_changes_decoding_keeps_transformers_path() -> None:
    ours = hf(tiny_tokenizer(Shouting))
    assert ours._backend_decode is None
    assert ours.decode(ours.encode("hello")) == "HELLO"

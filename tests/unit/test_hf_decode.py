"""HFTokenizer decodes through the Rust tokenizer where transformers adds nothing: the same text as
transformers' own decode, special tokens skipped, and transformers' path where a class changes it."""

from __future__ import annotations

import itertools

from transformers import PreTrainedTokenizerFast

from chatqueue.text.hf_tokenizer import HFTokenizer
from tests.support.tiny_tokenizer import tiny_tokenizer

TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
UNICODE = "héllo world, how are you today? ünïcode"


def hf(tokenizer: PreTrainedTokenizerFast) -> HFTokenizer:
    return HFTokenizer(tokenizer, model_name="tiny", eos_token_ids=(), chat_template=TEMPLATE)


def test_decode_matches_transformers_with_specials_and_split_characters() -> None:
    tokenizer = tiny_tokenizer(text=UNICODE, vocab_size=300)
    ours = hf(tokenizer)
    assert ours._backend is not None  # the fast path is the one under test
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
    ours = hf(tiny_tokenizer(Shouting, text=UNICODE, vocab_size=300))
    assert ours._backend is None
    assert ours.decode(ours.encode("hello")) == "HELLO"

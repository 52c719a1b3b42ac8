"""The detokenizer over a tokenizer's own incremental decoder (the Rust tokenizers' DecodeStream)
streams what its Python window streams, token for token, on byte-level and SentencePiece-like
tokenizers, with special tokens and characters split over several tokens; where the stream raises,
the request goes on in the Python window from where it stood."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
from transformers import PreTrainedTokenizerFast

from chatqueue.text.detokenizer import IncrementalDetokenizer
from chatqueue.text.hf_tokenizer import HFTokenizer
from chatqueue.text.tokenizer import StepDecode
from chatqueue.types import ChatMessage
from tests.support.tiny_tokenizer import tiny_sentencepiece_tokenizer, tiny_tokenizer

TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
TEXT = "héllo world, how are you today? ünïcode 東京 🚀"


def hf(tokenizer: PreTrainedTokenizerFast) -> HFTokenizer:
    return HFTokenizer(tokenizer, model_name="tiny", eos_token_ids=(), chat_template=TEMPLATE)


def deltas(tokenizer: HFTokenizer, ids: Sequence[int], *, stream: bool) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer)
    assert (detok._step is not None) is True  # the tokenizer has one: the test turns it off
    if not stream:
        detok._step = None
    return [detok.push(i) for i in ids] + [detok.flush()]


def replies(tokenizer: PreTrainedTokenizerFast, n: int) -> list[list[int]]:
    """Its encoding of the text, then random ids of its whole vocabulary (specials, bytes alone,
    whose text as a whole may differ from what streams: the same for both ways), and the text
    cut short."""
    rng = random.Random(0)
    encoded = tokenizer.encode(TEXT, add_special_tokens=False)
    vocab = len(tokenizer)
    out = [encoded]
    for _ in range(n):
        out.append([rng.randrange(vocab) for _ in range(rng.randrange(1, 40))])
        cut = rng.randrange(1, len(encoded) + 1)  # a reply cut inside a split character
        out.append(encoded[:cut])
    return out


@pytest.mark.parametrize(
    "make", [lambda: tiny_tokenizer(text=TEXT, vocab_size=300), tiny_sentencepiece_tokenizer]
)
def test_the_stream_decoder_streams_what_the_python_window_streams(make) -> None:  # type: ignore[no-untyped-def]
    tokenizer = make()
    ours = hf(tokenizer)
    for ids in replies(tokenizer, 200):
        assert deltas(ours, ids, stream=True) == deltas(ours, ids, stream=False), ids
    encoded = tokenizer.encode(TEXT, add_special_tokens=False)
    assert "".join(deltas(ours, encoded, stream=True)) == TEXT


class Raises:
    """A tokenizer whose stream decoder raises at its third token (as DecodeStream does where the
    text before a token is not the start of the text with it)."""

    eos_token_ids = frozenset({0})

    def __init__(self) -> None:
        self.steps = 0

    def apply_chat_template(self, messages: Sequence[ChatMessage]) -> list[int]:
        return [1]

    def decode(self, token_ids: Sequence[int]) -> str:
        return "".join(f" w{t}" for t in token_ids)

    def stream_decoder(self) -> StepDecode:
        def step(token_id: int) -> str:
            self.steps += 1
            if self.steps == 3:
                raise RuntimeError("Invalid prefix encountered")
            return f" w{token_id}"

        return step


def test_a_stream_that_raises_goes_on_in_the_python_window() -> None:
    tokenizer = Raises()
    detok = IncrementalDetokenizer(tokenizer)
    out = [detok.push(t) for t in (1, 2, 3, 4, 5)]
    assert out == [" w1", " w2", " w3", " w4", " w5"]
    assert detok._step is None and tokenizer.steps == 3  # the stream is no longer asked
    assert detok.flush() == ""


def test_a_tokenizer_without_a_stream_decoder_uses_the_python_window() -> None:
    class Plain(Raises):
        stream_decoder = None  # type: ignore[assignment]

    detok = IncrementalDetokenizer(Plain())
    assert detok._step is None
    assert [detok.push(t) for t in (7, 8)] == [" w7", " w8"]

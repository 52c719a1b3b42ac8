"""Detokenization and stop strings, on a byte-level toy tokenizer."""

from __future__ import annotations

from collections.abc import Sequence

from chatqueue.engine.sequence import Sequence as GenSequence
from chatqueue.text.detokenizer import IncrementalDetokenizer
from chatqueue.text.stops import StopStrings
from chatqueue.types import ChatMessage, FinishReason, SamplingParams


class ByteTokenizer:
    """One token per UTF-8 byte (id = byte value), EOS = 256: splits every multi-byte character."""

    eos_token_ids = frozenset({256})

    def apply_chat_template(self, messages: Sequence[ChatMessage]) -> list[int]:
        return list(messages[-1].content.encode())

    def decode(self, token_ids: Sequence[int]) -> str:
        return bytes(t for t in token_ids if t < 256).decode("utf-8", errors="replace")


def stream(text: str) -> list[str]:
    detok = IncrementalDetokenizer(ByteTokenizer())
    return [detok.push(b) for b in text.encode()]


def test_split_characters_never_stream_as_replacement() -> None:
    text = "東京は日本の首都です 🗼!"
    deltas = stream(text)
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
    assert deltas[0] == "" and deltas[2] == "東"  # held until its third byte


def test_flush_drops_an_incomplete_character_at_the_end() -> None:
    detok = IncrementalDetokenizer(ByteTokenizer())
    deltas = [detok.push(b) for b in "a東".encode()[:-1]]
    assert [*deltas, detok.flush()] == ["a", "", "", ""]


class SpaceTokenizer:
    """SentencePiece-like: a token is a word with a leading space, and the text's first space is
    dropped, so a token decodes differently alone than after another."""

    eos_token_ids = frozenset({0})
    words = ("", "Hello", "world", "again", "Hello")

    def apply_chat_template(self, messages: Sequence[ChatMessage]) -> list[int]:
        return [1]

    def decode(self, token_ids: Sequence[int]) -> str:
        return "".join(" " + self.words[t] for t in token_ids if t).removeprefix(" ")


def test_every_request_over_one_tokenizer_streams_the_same_text() -> None:
    tokenizer = SpaceTokenizer()
    for _ in range(2):  # the second finds the pieces the first decoded
        detok = IncrementalDetokenizer(tokenizer)
        deltas = [detok.push(t) for t in (1, 2, 3, 4, 2)]
        assert deltas == ["Hello", " world", " again", " Hello", " world"]
        assert detok.flush() == ""


def test_stop_string_ends_the_text_and_is_not_emitted() -> None:
    stops = StopStrings(["END"])
    out = [stops.push(d) for d in ["abc E", "N", "D tail"]]
    assert out == [("abc ", False), ("", False), ("", True)]


def test_text_that_only_looked_like_a_stop_is_released() -> None:
    stops = StopStrings(["STOP"])
    assert stops.push("xST") == ("x", False)
    assert stops.push("AR") == ("STAR", False)
    assert stops.flush() == ""
    assert StopStrings(["STOP"]).push("abcST") == ("abc", False)


def test_earliest_of_several_stops_wins() -> None:
    assert StopStrings(["b", "a"]).push("xxaxb") == ("xx", True)


class Nobody:
    def push(self, event: object) -> None:
        pass


def seq(text_limit: int = 100, **kw: object) -> GenSequence:
    return GenSequence(
        rid=1,
        arrival=0.0,
        prompt_ids=[1, 2],
        params=SamplingParams(**kw),  # type: ignore[arg-type]
        max_new_tokens=text_limit,
        tokenizer=ByteTokenizer(),
        sink=Nobody(),
    )


def test_sequence_finishes_on_eos_length_and_stop() -> None:
    s = seq()
    assert [s.append(t).finish for t in b"hi"] == [None, None]
    assert s.append(256).finish is FinishReason.STOP and s.text == "hi"
    assert s.num_output_tokens == 2  # EOS is not part of the output

    s = seq(text_limit=3)
    steps = [s.append(t) for t in b"abc"]
    assert steps[-1].finish is FinishReason.LENGTH and s.text == "abc"

    s = seq(stop=("lo w",))
    stop_at = next(i for i, t in enumerate(b"hello world") if s.append(t).finish)
    assert stop_at == 6  # at the "w" of "hello world"
    assert s.text == "hel"


def test_ignore_eos_keeps_generating() -> None:
    s = seq(ignore_eos=True)
    assert s.append(256).finish is None


def streamed(s: GenSequence, data: bytes, interval: int) -> list[tuple[str, int]]:
    """(text, tokens) of each Token the sequence streams, one byte-token at a time."""
    tokens = [s.streamed(s.append(t), interval) for t in data]
    return [(t.text, t.num_tokens) for t in tokens if t is not None]


def test_stream_interval_sends_the_first_token_then_every_n_and_the_last_at_once() -> None:
    assert streamed(seq(), b"abcdef", 1) == [(c, 1) for c in "abcdef"]
    assert streamed(seq(), b"abcdef", 2) == [("a", 1), ("bc", 2), ("de", 2)]
    s = seq(text_limit=6)
    assert streamed(s, b"abcdef", 4) == [("a", 1), ("bcde", 4), ("f", 1)]
    assert s.text == "abcdef"


def test_stream_interval_starts_counting_after_a_first_token_without_text() -> None:
    s = seq(text_limit=4)
    # "é" is two byte-tokens: the first streams nothing (half a character), so it is no reason to
    # hold what follows; the interval counts from the second
    assert streamed(s, "éab".encode(), 2) == [("éa", 2), ("b", 1)]

"""Incremental detokenization: stream only complete characters."""

from __future__ import annotations

import weakref

from chatqueue.text.tokenizer import StepDecode, StreamDecoding, Tokenizer

_REPLACEMENT = "\ufffd"
# tokenizer -> token id -> that one token decoded alone, shared by every request's detokenizer
_PIECES: weakref.WeakKeyDictionary[Tokenizer, dict[int, str]] = weakref.WeakKeyDictionary()


class IncrementalDetokenizer:
    """Turns token ids into text deltas, one token at a time.

    A character split across byte-level tokens decodes to U+FFFD until its last byte arrives, so a
    delta ending in U+FFFD is held back. Each decode looks at a short window (from `_prefix` on),
    not the whole output, and compares with the same window's text before the new token, which
    keeps tokenizers' leading-space rules right without re-decoding everything each step.

    A tokenizer with its own incremental decoder (`StreamDecoding`: the Rust tokenizers'
    DecodeStream, the same window in one call) decodes each token; this keeps the window's
    bounds beside it, so `flush` and a fallback to the Python window (where the stream raises)
    go on from the same place.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._pieces = _pieces_of(tokenizer)
        self._step: StepDecode | None = (
            tokenizer.stream_decoder() if isinstance(tokenizer, StreamDecoding) else None
        )
        self._ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # ids before this are already streamed

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        if self._step is None:
            return self._advance(final=False)
        try:
            text = self._step(token_id)
        except Exception:  # the window's text before the token changed: the Python way on
            self._step = None
            return self._advance(final=False)
        if text is None:
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text

    def flush(self) -> str:
        """What is still held back at the end. An incomplete character (max_tokens cut its bytes
        short) is dropped: it would only ever reach the client as U+FFFD."""
        return self._advance(final=True).rstrip(_REPLACEMENT)

    def _advance(self, *, final: bool) -> str:
        decode = self._tokenizer.decode
        before = self._before()
        after = decode(self._ids[self._prefix :])
        if len(after) <= len(before) or (after.endswith(_REPLACEMENT) and not final):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before) :]

    def _before(self) -> str:
        """The window's text before the new token. NOTE: mostly the one token streamed last, and
        a token decoded alone is always the same text: found in the tokenizer's pieces, that is
        one decode a token rather than two (the engine thread's, holding the GIL)."""
        ids = self._ids[self._prefix : self._read]
        if len(ids) != 1 or self._pieces is None:
            return self._tokenizer.decode(ids)
        piece = self._pieces.get(ids[0])
        if piece is None:
            piece = self._pieces[ids[0]] = self._tokenizer.decode(ids)
        return piece


def _pieces_of(tokenizer: Tokenizer) -> dict[int, str] | None:
    """The tokenizer's pieces decoded so far; None for one that cannot be weakly keyed (then each
    is decoded every time)."""
    try:
        return _PIECES.setdefault(tokenizer, {})
    except TypeError:
        return None

"""Incremental detokenization: stream only complete characters."""

from __future__ import annotations

from chatqueue.text.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns token ids into text deltas, one token at a time.

    A character split across byte-level tokens decodes to U+FFFD until its last byte arrives, so a
    delta ending in U+FFFD is held back. Each decode looks at a short window (from `_prefix` on),
    not the whole output, and compares with the same window's text before the new token, which
    keeps tokenizers' leading-space rules right without re-decoding everything each step.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # ids before this are already streamed

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """What is still held back at the end. An incomplete character (max_tokens cut its bytes
        short) is dropped: it would only ever reach the client as U+FFFD."""
        return self._advance(final=True).rstrip(_REPLACEMENT)

    def _advance(self, *, final: bool) -> str:
        decode = self._tokenizer.decode
        before = decode(self._ids[self._prefix : self._read])
        after = decode(self._ids[self._prefix :])
        if len(after) <= len(before) or (after.endswith(_REPLACEMENT) and not final):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before) :]

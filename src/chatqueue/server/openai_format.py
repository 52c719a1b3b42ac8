"""OpenAI's response objects, for the two completion APIs: chat (`chat.completion[.chunk]`) and
the legacy text completions (`text_completion`). One builder per response; the routes and the
streaming loop they share (openai_routes.py) never spell a field."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from chatqueue.server import sse
from chatqueue.server.errors import usage_json
from chatqueue.types import Finished, TokenLogprob, Usage


def total_usage(finished: Sequence[Finished], n: int) -> Usage:
    """Every choice's completion tokens, and each prompt's tokens once (as OpenAI counts `n`):
    choices are prompt-major, the n choices of a prompt side by side."""
    return Usage(
        sum(f.usage.prompt_tokens for f in finished[::n]),
        sum(f.usage.completion_tokens for f in finished),
        cached_tokens=sum(f.usage.cached_tokens for f in finished[::n]),
    )


class _Builder:
    object_name: str  # of the whole response
    chunk_object: str  # of a streamed chunk

    def __init__(self, request_id: str, model: str, *, n: int = 1) -> None:
        self.id = request_id
        self.model = model
        self.n = n
        self.created = int(time.time())

    def head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        return {**self.head(self.chunk_object), "choices": [], "usage": usage_json(usage)}


class ChatBuilder(_Builder):
    object_name = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def __init__(self, request_id: str, model: str, *, n: int = 1) -> None:
        super().__init__(request_id, model, n=n)
        # NOTE: content chunks are most of the traffic; only their text is encoded per token.
        head, tail = sse.data(self.chunk(0, {"content": ""})).split('"content":""')
        self._content_head, self._content_tail = head + '"content":', tail

    def chunk(
        self,
        index: int,
        delta: dict[str, Any],
        finish_reason: str | None = None,
        logprobs: Sequence[TokenLogprob] = (),
    ) -> dict[str, Any]:
        choice = {
            "index": index,
            "delta": delta,
            "logprobs": {"content": chat_logprobs(logprobs)} if logprobs else None,
            "finish_reason": finish_reason,
        }
        return {**self.head(self.chunk_object), "choices": [choice]}

    def started_line(self, index: int) -> str:
        return sse.data(self.chunk(index, {"role": "assistant", "content": ""}))

    def token_line(self, index: int, text: str, logprobs: Sequence[TokenLogprob]) -> str:
        if index == 0 and not logprobs:
            # `sse.data(self.chunk(0, {"content": text}))`, byte for byte, at a fraction of the cost
            return self._content_head + json.dumps(text, ensure_ascii=False) + self._content_tail
        return sse.data(self.chunk(index, {"content": text}, logprobs=logprobs))

    def finish_line(self, index: int, finished: Finished) -> str:
        return sse.data(self.chunk(index, {}, finish_reason=finished.reason.value))

    def completion(self, finished: Sequence[Finished], *, wants_logprobs: bool) -> dict[str, Any]:
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": f.text},
                "logprobs": {"content": chat_logprobs(f.logprobs)} if wants_logprobs else None,
                "finish_reason": f.reason.value,
            }
            for i, f in enumerate(finished)
        ]
        usage = usage_json(total_usage(finished, self.n))
        return {**self.head(self.object_name), "choices": choices, "usage": usage}


class TextBuilder(_Builder):
    """The legacy completions API. `echo` puts each choice's prompt text before its completion."""

    object_name = chunk_object = "text_completion"

    def __init__(self, request_id: str, model: str, *, n: int = 1, echoes: Sequence[str]) -> None:
        super().__init__(request_id, model, n=n)
        self.echoes = echoes  # per choice: "" unless echo
        self._offsets = [len(e) for e in echoes]  # text_offset of the next token, per choice

    def chunk(
        self,
        index: int,
        text: str,
        finish_reason: str | None = None,
        logprobs: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        choice = {
            "index": index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": finish_reason,
        }
        return {**self.head(self.chunk_object), "choices": [choice]}

    def started_line(self, index: int) -> str | None:
        echo = self.echoes[index]
        return sse.data(self.chunk(index, echo)) if echo else None

    def token_line(self, index: int, text: str, logprobs: Sequence[TokenLogprob]) -> str:
        lp = None
        if logprobs:
            lp = text_logprobs(logprobs, self._offsets[index])
            self._offsets[index] += sum(len(t.token) for t in logprobs)
        return sse.data(self.chunk(index, text, logprobs=lp))

    def finish_line(self, index: int, finished: Finished) -> str:
        return sse.data(self.chunk(index, "", finish_reason=finished.reason.value))

    def completion(self, finished: Sequence[Finished], *, wants_logprobs: bool) -> dict[str, Any]:
        choices = [
            {
                "index": i,
                "text": self.echoes[i] + f.text,
                "logprobs": text_logprobs(f.logprobs, len(self.echoes[i]))
                if wants_logprobs
                else None,
                "finish_reason": f.reason.value,
            }
            for i, f in enumerate(finished)
        ]
        usage = usage_json(total_usage(finished, self.n))
        return {**self.head(self.object_name), "choices": choices, "usage": usage}


def chat_logprobs(logprobs: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
    """`choices[].logprobs.content`: one entry a generated token."""
    return [
        {
            "token": t.token,
            "logprob": t.logprob,
            "bytes": list(t.bytes),
            "top_logprobs": [
                {"token": a.token, "logprob": a.logprob, "bytes": list(a.bytes)} for a in t.top
            ],
        }
        for t in logprobs
    ]


def text_logprobs(logprobs: Sequence[TokenLogprob], offset: int) -> dict[str, Any]:
    """The legacy API's columns: `tokens`, `token_logprobs`, `top_logprobs` (a dict per token,
    token text -> logprob) and `text_offset` (each token's start in the choice's text)."""
    offsets = []
    for t in logprobs:
        offsets.append(offset)
        offset += len(t.token)
    return {
        "tokens": [t.token for t in logprobs],
        "token_logprobs": [t.logprob for t in logprobs],
        "top_logprobs": [{a.token: a.logprob for a in t.top} for t in logprobs],
        "text_offset": offsets,
    }

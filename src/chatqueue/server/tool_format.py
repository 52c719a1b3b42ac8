"""OpenAI's shapes of tool calls: a chat response whose choices may call tools. The model's text
goes through `text.tool_calls`' parser, one per choice; what it finds is sent as OpenAI sends it:
streamed, a `tool_calls` delta with the call's id, type and function name, then deltas with
fragments of its arguments; whole, `message.tool_calls`. A choice that called ends with
`finish_reason: "tool_calls"`."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any

from chatqueue.server import sse
from chatqueue.server.errors import usage_json
from chatqueue.server.openai_format import ChatBuilder, chat_logprobs, total_usage
from chatqueue.text.tool_calls import (
    ArgumentsDelta,
    CallStart,
    ContentDelta,
    Delta,
    ToolCallFormat,
    ToolCallParser,
    parse_reply,
)
from chatqueue.types import Finished, FinishReason, TokenLogprob


def call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def finish_reason(finished: Finished, num_calls: int) -> str:
    if num_calls and finished.reason is FinishReason.STOP:
        return "tool_calls"
    return finished.reason.value


class ToolChatBuilder(ChatBuilder):
    def __init__(self, request_id: str, model: str, *, n: int = 1, fmt: ToolCallFormat) -> None:
        super().__init__(request_id, model, n=n)
        self.fmt = fmt
        self._parsers = [ToolCallParser(fmt) for _ in range(n)]
        self._ids: list[dict[int, str]] = [{} for _ in range(n)]  # call index -> its id
        self._logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]  # not sent yet

    def token_line(self, index: int, text: str, logprobs: Sequence[TokenLogprob]) -> str:
        self._logprobs[index] += logprobs
        return self._lines(index, self._parsers[index].push(text))

    def finish_line(self, index: int, finished: Finished) -> str:
        parser = self._parsers[index]
        lines = self._lines(index, parser.finish())
        if self._logprobs[index]:  # held back with text that turned out to be nothing to send
            lines += sse.data(self.chunk(index, {}, logprobs=self._take_logprobs(index)))
        reason = finish_reason(finished, len(parser.calls))
        return lines + sse.data(self.chunk(index, {}, finish_reason=reason))

    def completion(self, finished: Sequence[Finished], *, wants_logprobs: bool) -> dict[str, Any]:
        choices = []
        for i, f in enumerate(finished):
            reply = parse_reply(f.text, self.fmt)
            message: dict[str, Any] = {"role": "assistant", "content": reply.content or None}
            if reply.calls:
                message["tool_calls"] = [
                    {
                        "id": call_id(),
                        "type": "function",
                        "function": {"name": name, "arguments": arguments},
                    }
                    for name, arguments in reply.calls
                ]
            else:
                message["content"] = reply.content
            choices.append(
                {
                    "index": i,
                    "message": message,
                    "logprobs": {"content": chat_logprobs(f.logprobs)} if wants_logprobs else None,
                    "finish_reason": finish_reason(f, len(reply.calls)),
                }
            )
        usage = usage_json(total_usage(finished, self.n))
        return {**self.head(self.object_name), "choices": choices, "usage": usage}

    def _lines(self, index: int, deltas: Sequence[Delta]) -> str:
        return "".join(
            sse.data(self.chunk(index, self._delta(index, d), logprobs=self._take_logprobs(index)))
            for d in deltas
        )

    def _delta(self, index: int, delta: Delta) -> dict[str, Any]:
        match delta:
            case ContentDelta(text):
                return {"content": text}
            case CallStart(call, name):
                self._ids[index][call] = call_id()
                function = {"name": name, "arguments": ""}
                entry = {"index": call, "id": self._ids[index][call], "type": "function"}
                return {"tool_calls": [{**entry, "function": function}]}
            case ArgumentsDelta(call, text):
                return {"tool_calls": [{"index": call, "function": {"arguments": text}}]}

    def _take_logprobs(self, index: int) -> list[TokenLogprob]:
        taken, self._logprobs[index] = self._logprobs[index], []
        return taken

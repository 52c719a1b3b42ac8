"""SSE: a response owns its request stream (however the response ends, the request is closed), and
the fast path for content chunks writes what the plain path would."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from chatqueue.api import RequestStream
from chatqueue.server import sse
from chatqueue.server.openai_format import ChatBuilder
from chatqueue.server.sse import EventStreamResponse


async def test_a_client_gone_before_the_body_started_still_aborts_the_request() -> None:
    abandoned: list[bool] = []
    stream = RequestStream("r1", on_abandon=lambda: abandoned.append(True))
    started: list[bool] = []

    async def body() -> AsyncIterator[str]:
        started.append(True)  # never reached: the client left first
        yield "data: x\n\n"

    async def receive() -> dict[str, object]:
        return {"type": "http.disconnect"}

    async def send(message: dict[str, object]) -> None:
        await asyncio.sleep(3600)  # a slow socket: the body is never reached

    scope = {"type": "http", "asgi": {"spec_version": "2.3"}}
    response = EventStreamResponse(body(), stream=stream)
    await asyncio.wait_for(response(scope, receive, send), 5)  # type: ignore[arg-type]
    assert started == [] and abandoned == [True]


def test_fast_content_chunk_is_the_plain_chunk_byte_for_byte() -> None:
    chunks = ChatBuilder("chatcmpl-1", "m")
    for text in ["", "hi", ' "quoted"\n', "東京 🗼", "\\"]:
        assert chunks.token_line(0, text, ()) == sse.data(chunks.chunk(0, {"content": text}))

"""The chat event stream (SSE): `queued`, `token`, `done`, `error`. What the web page reads, and
what an embedding app's route returns (`handle_chat_stream_request`, the ChatStream way)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response

from chatqueue.api import ChatQueue, RequestStream
from chatqueue.errors import ChatQueueError, InvalidRequest
from chatqueue.server import sse
from chatqueue.server.errors import error_of, error_response, usage_json
from chatqueue.server.schemas import ChatStreamRequest
from chatqueue.types import Finished, FinishReason, Queued, Token


async def chat_events(
    stream: RequestStream,
    *,
    on_done: Callable[[Finished], Awaitable[dict[str, Any]]] | None = None,
    on_token: Callable[[str], Awaitable[None]] | None = None,
) -> AsyncIterator[str]:
    """SSE lines for one request. `on_done` runs before the `done` event is sent (the chat
    routes store the reply there) and may add fields to it, or raise a ChatQueueError, sent as an
    `error` event instead; `on_token` sees the text as it streams (what a client that goes away
    mid-reply has already been sent)."""
    async with stream:
        async for ev in stream:
            if isinstance(ev, Queued):
                yield sse.event("queued", {"position": ev.position, "eta_s": ev.eta_s})
            elif isinstance(ev, Token):
                if on_token is not None:
                    await on_token(ev.text)
                yield sse.event("token", {"text": ev.text})
            elif isinstance(ev, Finished):
                try:
                    extra = await on_done(ev) if on_done is not None else {}
                except ChatQueueError as exc:
                    yield sse.event("error", {"type": exc.kind, "message": exc.message})
                    return
                err = error_of(ev) if ev.reason is FinishReason.ERROR else None
                if err is not None:
                    yield sse.event("error", {"type": err.kind, "message": err.message})
                else:
                    usage = usage_json(ev.usage)
                    yield sse.event(
                        "done", {"finish_reason": ev.reason.value, "usage": usage, **extra}
                    )


async def handle_chat_stream_request(chat_queue: ChatQueue, request: Request) -> Response:
    """Turn a Starlette request (JSON: messages + sampling fields) into an SSE response of chat
    events: queued, token, done, error. Errors before the stream opens are JSON responses."""
    try:
        try:
            body = ChatStreamRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(x) for x in first.get("loc", ()))
            raise InvalidRequest(f"{where}: {first.get('msg')}" if where else first["msg"]) from exc
        stream = await chat_queue.submit(
            body.chat_messages(),
            body.sampling_params(chat_queue.sampling_defaults),
            user=body.user or "",
        )
    except ChatQueueError as exc:
        return error_response(exc)
    return sse.EventStreamResponse(chat_events(stream), stream=stream)

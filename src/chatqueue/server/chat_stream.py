"""The chat event stream (SSE): `queued`, `token`, `done`, `error`. What the web page reads, and
what `ChatQueue.handle_chat_stream_request` returns to an embedding app."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from chatqueue.engine.stream import RequestStream
from chatqueue.errors import ChatQueueError, InvalidRequest
from chatqueue.server import sse
from chatqueue.server.errors import error_body, error_response
from chatqueue.server.schemas import ChatStreamRequest
from chatqueue.types import Finished, FinishReason, Queued, Token

if TYPE_CHECKING:
    from chatqueue.chat_queue import ChatQueue


async def chat_events(
    stream: RequestStream,
    *,
    on_done: Callable[[Finished], dict[str, Any]] | None = None,
    on_token: Callable[[str], None] | None = None,
) -> AsyncIterator[str]:
    """SSE lines for one request. `on_done` may add fields to the `done` event; `on_token` sees
    the text as it streams (what a client that goes away mid-reply has already been sent)."""
    async with stream:
        async for ev in stream:
            if isinstance(ev, Queued):
                yield sse.event("queued", {"position": ev.position, "eta_s": ev.eta_s})
            elif isinstance(ev, Token):
                if on_token is not None:
                    on_token(ev.text)
                yield sse.event("token", {"text": ev.text})
            elif isinstance(ev, Finished):
                extra = on_done(ev) if on_done is not None else {}
                if ev.reason is FinishReason.ERROR:
                    err = ev.error if isinstance(ev.error, ChatQueueError) else None
                    yield sse.event(
                        "error",
                        {
                            "type": err.error_type if err else "server_error",
                            "message": err.message if err else "The generation failed.",
                        },
                    )
                else:
                    usage = {
                        "prompt_tokens": ev.usage.prompt_tokens,
                        "completion_tokens": ev.usage.completion_tokens,
                    }
                    yield sse.event(
                        "done", {"finish_reason": ev.reason.value, "usage": usage, **extra}
                    )


async def chat_stream_response(cq: ChatQueue, request: Request) -> Response:
    try:
        raw = await request.body()
        try:
            body = ChatStreamRequest.model_validate_json(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(x) for x in first.get("loc", ()))
            raise InvalidRequest(f"{where}: {first.get('msg')}" if where else first["msg"]) from exc
        stream = await cq.submit(body.chat_messages(), body.sampling_params(), user=body.user or "")
    except ChatQueueError as exc:
        return error_response(exc)
    except json.JSONDecodeError:
        return JSONResponse(error_body("Invalid JSON.", "invalid_request_error"), status_code=400)
    return sse.EventStreamResponse(chat_events(stream), stream=stream)

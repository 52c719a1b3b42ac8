"""Server-sent events: framing, and waiting for a client that may go away."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Mapping
from typing import Any, Protocol, TypeVar

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from chatqueue.errors import ClientGone

T = TypeVar("T")


class Closable(Protocol):
    async def aclose(self) -> None: ...


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def data(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def event(name: str, payload: Any) -> str:
    return f"event: {name}\n{data(payload)}"


def comment(text: str) -> str:
    return f": {text}\n\n"


class EventStreamResponse(StreamingResponse):
    """SSE for one request stream (or the streams of its choices). The stream is closed (the request aborted, if unfinished) when
    the response ends however it ends: a client that leaves before the body generator ever ran
    would otherwise leave its generation running with nobody reading."""

    def __init__(
        self,
        content: AsyncIterator[str],
        *,
        stream: Closable,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(
            content, media_type="text/event-stream", headers={**SSE_HEADERS, **(headers or {})}
        )
        self._stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._stream.aclose()


async def until_disconnect(request: Request) -> None:
    """Returns when the client disconnects (the body has already been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, or cancel it and raise ClientGone if the client leaves first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(until_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        raise ClientGone
    return task.result()

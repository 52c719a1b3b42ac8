"""Limits on what a request may ask of the server: body size (an ASGI middleware, before any route
reads a byte) and the number of messages."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatqueue.errors import InvalidRequest, PayloadTooLarge
from chatqueue.server.errors import error_response

# A refused body up to this much larger is read to its end, and thrown away, before the 413: a
# server that answers and hangs up while the client still sends makes the client's TCP stack see
# a reset, and most clients then report a broken connection instead of the 413.
DRAIN_BYTES = 1 << 20


class BodySizeLimit:
    """413 for a body over `max_bytes`: before reading it when Content-Length says so, else
    (chunked) as soon as the bytes read pass the limit.

    NOTE: the body is read here, whole, before the app runs, then handed on as one message; our
    bodies are small JSON that the routes read whole anyway, and so a 413 is always a clean
    response, never a route failing half-way through reading."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            if declared <= self.max_bytes + DRAIN_BYTES:
                await _drain(receive, DRAIN_BYTES + self.max_bytes)
            await self._refuse(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # gone before the body was in
                await self.app(scope, _replay([], message, receive), send)
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                if message.get("more_body", False):
                    await _drain(receive, DRAIN_BYTES)
                await self._refuse(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([body], None, receive), send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(
            PayloadTooLarge(f"The request body is larger than {self.max_bytes} bytes.")
        )
        response.headers["Connection"] = "close"  # what is left of the body is never read
        await response(scope, receive, send)


async def _drain(receive: Receive, most_bytes: int) -> None:
    """Read the rest of the body, up to `most_bytes`, and throw it away."""
    while most_bytes > 0:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
        most_bytes -= len(message.get("body", b""))


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server's HTTP parser refuses these before we see them
    return None


def _replay(first: list[Message], then: Message | None, receive: Receive) -> Receive:
    """A `receive` that hands out what was already read, then goes back to the client (whose
    `http.disconnect` the streaming routes wait for)."""
    pending = [*first, *([then] if then is not None else [])]

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay


def check_num_messages(num_messages: int, max_messages: int) -> None:
    if num_messages > max_messages:
        raise InvalidRequest(
            f"The request has {num_messages} messages; this server takes at most {max_messages}.",
            param="messages",
        )

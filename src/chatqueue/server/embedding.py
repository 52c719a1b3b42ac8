"""The ChatStream way to embed: `chatqueue.ChatQueue` is the queue with its HTTP adapter."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from chatqueue import api
from chatqueue.server.chat_stream import handle_chat_stream_request


class ChatQueue(api.ChatQueue):
    """`chatqueue.api.ChatQueue` (the queue, which knows no HTTP) with one more method, for an
    app's own route: `return await chat_queue.handle_chat_stream_request(request)`."""

    async def handle_chat_stream_request(self, request: Request) -> Response:
        """SSE of chat events (queued, token, done, error) for a JSON body of messages and
        sampling fields; errors before the stream opens are JSON (429 with Retry-After, ...)."""
        return await handle_chat_stream_request(self, request)

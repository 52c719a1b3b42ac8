"""Run the app under uvicorn, with a graceful drain on SIGTERM/SIGINT.

On the first signal the server stops admitting (new requests get 503 "shutting_down"), lets what
is in flight finish for up to `shutdown_timeout`, aborts the rest, and exits 0. A second SIGINT
exits at once.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import signal
import socket
import sys
import urllib.parse
from collections.abc import Callable
from types import FrameType

import uvicorn
from fastapi import FastAPI

from chatqueue.api import QueueService
from chatqueue.config import Settings
from chatqueue.engine.process import ModelProcess
from chatqueue.server.app import create_app
from chatqueue.server.connections import timed_protocol
from chatqueue.server.ratelimit import Limiter

log = logging.getLogger(__name__)


# Query parameters that are secrets: a conversation id is the bearer token of its conversation
# (GET /chat/history?conversation_id=...). Their values never reach the access log.
SECRET_QUERY_PARAMS = frozenset({"conversation_id"})
REDACTED = "[redacted]"


class RedactSecrets(logging.Filter):
    """On "uvicorn.access": the secret query parameters' values in a logged path, redacted.

    NOTE: a filter rather than an access-log format of our own: uvicorn keeps its format (and
    whatever handlers --log-config gives it), and only the one argument that carries the path
    changes. uvicorn logs `'%s - "%s %s HTTP/%s" %d'` with the path and query third; a name is
    matched as the app reads it (percent-decoded), so `conversation%5Fid=` is caught too."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            record.args = (*args[:2], redact_query(args[2]), *args[3:])
        return True


def redact_query(path: str) -> str:
    head, sep, query = path.partition("?")
    if not sep:
        return path
    parts = []
    for part in query.split("&"):
        name = part.partition("=")[0]
        if urllib.parse.unquote_plus(name) in SECRET_QUERY_PARAMS:
            part = f"{name}={REDACTED}"
        parts.append(part)
    return f"{head}?{'&'.join(parts)}"


class _DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, chat_queue: QueueService, timeout_s: float) -> None:
        super().__init__(config)
        self._chat_queue = chat_queue
        self._timeout_s = timeout_s
        self._is_draining = False
        self._drain: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # NOTE: uvicorn's own handler re-raises the signal after shutdown (exit status 143); we
        # drain and exit 0 instead.
        if self._is_draining:
            if sig == signal.SIGINT:
                self.force_exit = True
            return
        self._is_draining = True
        log.info("signal %s: draining for up to %.0f s", signal.Signals(sig).name, self._timeout_s)
        loop = asyncio.get_event_loop()
        loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain = asyncio.get_running_loop().create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await self._chat_queue.stop(self._timeout_s)
        finally:
            self.should_exit = True


def tune_gc(young_threshold: int) -> None:
    """Collect the youngest generation every `young_threshold` allocations (older ones as before).

    NOTE: why. A server holds every stream's objects (request, response, tasks, buffers) for as
    long as it streams; at Python's 700 the young collections walked them every few hundred
    allocations, and they were promoted into full collections that walk every object. 256
    streams arriving together saw gen-0/1 pauses of 2-9 ms and full ones of 10-50 ms during the
    arrivals; at 100,000, none over 2 ms (benchmarks/RESULTS.md, issue 14). What loading leaves
    is frozen out of the collector's reach besides (Engine._serve)."""
    _, *older = gc.get_threshold()
    gc.set_threshold(young_threshold, *older)


def serve(
    settings: Settings,
    *,
    chat_queue: QueueService | None = None,
    model_process: ModelProcess | None = None,
    rate_limiter: Limiter | None = None,
    sockets: list[socket.socket] | None = None,
    on_app: Callable[[FastAPI], None] | None = None,
) -> None:
    """`chat_queue`: one made elsewhere (a cluster's front over its replicas, an API server's
    over the core). `model_process`: the model's process, started ahead for these settings
    (`engine.loading.head_start`). `sockets`: listen on these (shared by several API servers)
    rather than on --host and --port. `on_app`: called with the app before it serves (a
    benchmark's own routes)."""
    # NOTE: the engine thread and the event loop share the GIL. At the default 5 ms switch
    # interval a busy event loop makes the engine wait up to 5 ms for each GIL hand-back (several
    # a step), which stretched 20 ms mock steps to 35 ms at 256 streams.
    sys.setswitchinterval(0.0005)
    tune_gc(settings.gc_threshold)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = create_app(
        settings, chat_queue=chat_queue, model_process=model_process, rate_limiter=rate_limiter
    )
    if on_app is not None:
        on_app(app)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=5,
        timeout_keep_alive=math.ceil(settings.timeout_keep_alive),  # uvicorn takes whole seconds
        http=timed_protocol(
            header_timeout_s=settings.header_timeout, body_timeout_s=settings.body_timeout
        ),
    )
    logging.getLogger("uvicorn.access").addFilter(RedactSecrets())  # after Config set logging up
    _DrainingServer(config, app.state.chat_queue, settings.shutdown_timeout).run(sockets)

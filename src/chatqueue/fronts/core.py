"""The core's side: the one ChatQueue, served to every API server over a Unix socket.

Each API server holds one connection. Its submissions are admitted (or refused) by the ChatQueue
exactly as one server's would be, so positions, per-user caps, fairness and the 429s are the one
queue's whatever server a client reached; its admitted requests' events go back in one frame a
step (`api.outbox`); a request it abandons, or every request of a server whose connection ends
(the process died), is aborted at once and its slot freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Awaitable

from prometheus_client import generate_latest

from chatqueue.api import ChatQueue, LoadInfo, RequestStream
from chatqueue.api.outbox import Outbox
from chatqueue.api.wire import Admitted, Description, Refused, Submission
from chatqueue.errors import ChatQueueError
from chatqueue.fronts import link
from chatqueue.server.ratelimit import RateLimiter

log = logging.getLogger(__name__)

CORE = "core"  # the name admissions give (Admitted.replica)


class Core:
    """Serves `cq` to API servers: `await Core(cq).serve(path)`."""

    def __init__(self, cq: ChatQueue) -> None:
        self._cq = cq
        self._limiter = RateLimiter()
        self._connections: dict[_Connection, asyncio.Task[None]] = {}
        self._description: Description | None = None
        self._broadcast: asyncio.Task[None] | None = None

    async def serve(self, path: str) -> asyncio.Server:
        self._broadcast = asyncio.create_task(self._send_snapshots())
        return await asyncio.start_unix_server(self._connected, path)

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        connection = _Connection(self, reader, writer)
        self._connections[connection] = task
        try:
            connection.send(self.state())
            await connection.run()
        finally:
            del self._connections[connection]
            writer.close()

    async def close(self) -> None:
        """End every API server's connection (their requests are aborted)."""
        if self._broadcast is not None:
            self._broadcast.cancel()
        tasks = list(self._connections.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _send_snapshots(self) -> None:
        """Every API server's view of the core (what /health reads), refreshed."""
        while True:
            await asyncio.sleep(link.SNAPSHOT_EVERY_S)
            if self._connections:
                snapshot = self.state()
                for connection in self._connections:
                    connection.send(snapshot)

    # -- what a connection asks -----------------------------------------------------------
    async def admit(self, s: Submission) -> RequestStream:
        return await s.submit_to(self._cq)

    async def take_rate(self, check: link.RateCheck) -> None:
        await self._limiter.take(check.caller, check.per_minute)

    def load(self) -> LoadInfo:
        return self._cq.load()

    def metrics_text(self) -> bytes:
        return generate_latest(self._cq.metrics.registry)

    def state(self) -> link.Snapshot:
        cq = self._cq
        load = cq.load()
        is_ready = load.state == "ready"
        if is_ready and self._description is None:
            self._description = Description(
                model_name=cq.model_name,
                context_window=cq.context_window,
                tokenizer=cq.tokenizer,
                max_concurrent=load.max_concurrent,
                max_queue_size=load.max_queue_size,
            )
        error = cq.load_error
        last_exit = cq.last_model_exit  # before the state, as /health reads them
        return link.Snapshot(
            health=cq.health,
            load=load,
            load_error=None if error is None else str(error),
            last_model_exit=last_exit,
            unavailable=cq.unavailable_error(),
            description=self._description,
            token_budget=cq.token_budget if is_ready else None,
            engine_info=cq.engine_info if is_ready else {},
        )


class _Connection:
    """One API server's connection: its calls, its requests' events, snapshots of the core."""

    def __init__(
        self, core: Core, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._core = core
        self._reader = reader
        self._writer = writer
        self._outbox = Outbox(forever=True)
        self._requests: dict[str, asyncio.Task[None]] = {}  # by key, while admitted
        self._admitting: set[str] = set()
        self._abandoned: set[str] = set()  # keys abandoned before their admission was done
        self._tasks: set[asyncio.Task[None]] = set()
        self._has_description = False

    async def run(self) -> None:
        background = [asyncio.create_task(self._send_events())]
        try:
            while True:
                try:
                    message = await link.read(self._reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return  # the API server is gone
                if isinstance(message, link.Call):
                    self._spawn(self._answer(message))
                elif isinstance(message, link.Abandon):
                    self._abandon(message.key)
        finally:
            for task in [*background, *self._tasks, *self._requests.values()]:
                task.cancel()
            # NOTE: cancelled, each request's task leaves its stream's `async with`: aborted
            pending = [*background, *self._tasks, *self._requests.values()]
            await asyncio.gather(*pending, return_exceptions=True)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, call: link.Call) -> None:
        what = call.what
        result: link.Answer = None
        if isinstance(what, link.RateCheck):
            try:
                await self._core.take_rate(what)
            except ChatQueueError as exc:
                result = exc
        elif isinstance(what, link.MetricsText):
            result = self._core.metrics_text()
        elif isinstance(what, link.LoadNow):
            result = self._core.load()
        else:
            result = await self._admit(what)
        self.send(link.Reply(call.id, result))

    async def _admit(self, s: Submission) -> Admitted | Refused:
        self._admitting.add(s.key)
        try:
            stream = await self._core.admit(s)
        except ChatQueueError as exc:
            load = self._core.load()
            return Refused(CORE, exc, load.waiting, load.drain_rate_per_s)
        finally:
            self._admitting.discard(s.key)
        if s.key in self._abandoned:  # its client went while it was being admitted
            self._abandoned.discard(s.key)
            await stream.aclose()
            return Admitted(CORE, stream.request_id)
        self._outbox.add(s.key, stream)
        self._requests[s.key] = asyncio.create_task(self._follow(s.key, stream))
        return Admitted(CORE, stream.request_id)

    async def _follow(self, key: str, stream: RequestStream) -> None:
        """Until the request's end is on its way; cancelled (abandoned), it aborts."""
        try:
            async with stream:
                await self._outbox.until_sent(key)
        finally:
            self._requests.pop(key, None)

    def _abandon(self, key: str) -> None:
        task = self._requests.get(key)
        if task is not None:
            task.cancel()
        elif key in self._admitting:
            self._abandoned.add(key)
        # else: it has ended already

    async def _send_events(self) -> None:
        async for batch in self._outbox.batches():
            self.send(link.Events.of(batch))
            await self._writer.drain()  # a server that reads slowly gets merged tokens, later

    def send(self, message: object) -> None:
        if isinstance(message, link.Snapshot) and message.description is not None:
            if self._has_description:  # the tokenizer travels once
                message = dataclasses.replace(message, description=None)
            self._has_description = True
        with contextlib.suppress(ConnectionError, RuntimeError):  # gone: `run` ends it all
            link.write(self._writer, message)

"""A front's own line to each replica for placing requests: a TCP connection to a port the replica
listens on (its node's address, published in its figures), one frame a wave and one its answer
(`api.frames`). The front proves itself first with a secret both were given when the app was
built: the replica sends a nonce, the front answers its HMAC, and nothing is unpickled before.

NOTE: why not a Serve call. Measured on the 2-vCPU machine at 32 streams (`bench_cluster.py`'s
load): a wave's Serve call took ~9 ms p50 from send to answer, 4-8 ms of it before the replica's
method ran (the handle's router thread, Ray's task submission, Serve's replica wrapper and its
user-code thread), and ~4 ms of CPU over both processes whatever it carried; the next wave waits
for it, so a request's placement took 20-40 ms p50. Serve still deploys, health-checks and scales
the replicas, publishes their figures to the router, and carries their events to the front (one
streaming call a front and replica). Where a line is not there (not yet published, refused, or
broken), the wave goes by a Serve call as before; a replica answers a request it has already
taken (a line that broke after it took the wave) with the same outcome, not a second admission.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import itertools
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from chatqueue.api import frames
from chatqueue.cluster.wave import Wave, WaveAnswer

log = logging.getLogger(__name__)
T = TypeVar("T")

NONCE_BYTES = 16
HELLO_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 2.0
RETRY_AFTER_S = 30.0  # a line that could not be opened is not tried again for this long
REMEMBERED = 65_536  # outcomes a replica keeps by (front, key), for a wave sent twice


def new_secret() -> bytes:
    return secrets.token_bytes(32)


def _proof(secret: bytes, nonce: bytes) -> bytes:
    return hmac.new(secret, nonce, hashlib.sha256).digest()


@dataclass(frozen=True, slots=True)
class LinkCall:
    id: int
    replica: str  # the replica the front means (a restarted one may listen where it did)
    wave: Wave


@dataclass(frozen=True, slots=True)
class LinkReply:
    id: int
    answer: WaveAnswer


class LineBroken(Exception):
    """The line could not be opened, or closed before the answer came."""


# -- the replica's end ----------------------------------------------------------------------
class LinkServer:
    """Listens for fronts' lines and answers each wave with `place(wave, replica meant)`, in the
    order they come."""

    def __init__(self, secret: bytes, place: Callable[[Wave, str], Awaitable[WaveAnswer]]) -> None:
        self._secret = secret
        self._place = place
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self, host: str) -> str:
        """Listen on `host` (this node's address) and a free port; returns "host:port"."""
        self._server = await asyncio.start_server(self._accept, host, 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"{host}:{port}"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            if await self._admits(reader, writer):
                await self._serve(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass  # the front went away
        except Exception:  # a bug: the front's line breaks, and it places by Serve
            log.exception("a front's line failed")
        finally:
            self._connections.discard(task)
            writer.close()

    async def _admits(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        nonce = secrets.token_bytes(NONCE_BYTES)
        writer.write(nonce)
        proof = await asyncio.wait_for(reader.readexactly(32), HELLO_TIMEOUT_S)
        if hmac.compare_digest(proof, _proof(self._secret, nonce)):
            return True
        peer = writer.get_extra_info("peername")
        log.warning("a connection from %s did not prove the cluster's secret: closed", peer)
        return False

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            call = await frames.read(reader)
            if not isinstance(call, LinkCall):
                log.warning("a front's line sent %s, not a wave: closed", type(call).__name__)
                return
            answer = await self._place(call.wave, call.replica)
            frames.write(writer, LinkReply(call.id, answer))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()


class Remembered(Generic[T]):
    """A replica's outcomes by (front, key), the most recent `size`: a wave that comes twice (by
    its line, then by a Serve call after the line broke) is answered the same, not admitted
    twice."""

    def __init__(self, size: int = REMEMBERED) -> None:
        self._size = size
        self._outcomes: OrderedDict[tuple[str, str], T] = OrderedDict()

    def get(self, front: str, key: str) -> T | None:
        return self._outcomes.get((front, key))

    def put(self, front: str, key: str, outcome: T) -> None:
        self._outcomes[(front, key)] = outcome
        if len(self._outcomes) > self._size:
            self._outcomes.popitem(last=False)

    def forget(self, front: str, key: str) -> None:
        self._outcomes.pop((front, key), None)


# -- the front's end ------------------------------------------------------------------------
class Line:
    """One front's connection to one replica. `place` raises LineBroken if it cannot answer."""

    def __init__(self, replica: str, address: str, secret: bytes) -> None:
        self.replica = replica
        self.address = address
        self._secret = secret
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[WaveAnswer]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._opening: asyncio.Task[None] | None = None
        self._reading: asyncio.Task[None] | None = None
        self.broken_at: float | None = None  # time.monotonic() when it broke

    async def place(self, wave: Wave) -> WaveAnswer:
        if self.broken_at is not None:
            raise LineBroken(f"the line to {self.address} is broken")
        if self._writer is None:
            if self._opening is None:
                self._opening = asyncio.ensure_future(self._open())
            await asyncio.shield(self._opening)
        assert self._writer is not None
        call = LinkCall(next(self._ids), self.replica, wave)
        answer: asyncio.Future[WaveAnswer] = asyncio.get_running_loop().create_future()
        self._pending[call.id] = answer
        try:
            frames.write(self._writer, call)
            return await answer
        finally:
            self._pending.pop(call.id, None)

    async def _open(self) -> None:
        host, _, port = self.address.rpartition(":")
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, int(port)), CONNECT_TIMEOUT_S
            )
            nonce = await asyncio.wait_for(reader.readexactly(NONCE_BYTES), HELLO_TIMEOUT_S)
            writer.write(_proof(self._secret, nonce))
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
            self._break(exc)
            raise LineBroken(f"no line to {self.address}: {exc!r}") from None
        self._writer = writer
        self._reading = asyncio.ensure_future(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                reply = await frames.read(reader)
                if isinstance(reply, LinkReply):
                    answer = self._pending.get(reply.id)
                    if answer is not None and not answer.done():
                        answer.set_result(reply.answer)
        except asyncio.CancelledError:
            self._break(LineBroken("closed"))
            raise
        except Exception as exc:  # closed, reset, or a frame it cannot read: broken either way
            self._break(exc)

    def _break(self, exc: BaseException) -> None:
        if self.broken_at is None:
            log.debug("the line to %s broke: %r", self.address, exc)
            self.broken_at = time.monotonic()
        for answer in self._pending.values():
            if not answer.done():
                answer.set_exception(LineBroken(f"the line to {self.address} broke: {exc!r}"))
        if self._writer is not None:
            self._writer.close()

    def close(self) -> None:
        if self._reading is not None:
            self._reading.cancel()
        self._break(LineBroken("closed"))


class Lines:
    """A front's lines, one a replica, opened on first use at the address its figures publish.
    A line that broke is replaced at once if the replica publishes another address (it was
    restarted), else tried again after `RETRY_AFTER_S` (meanwhile its waves go by Serve)."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret
        self._lines: dict[str, Line] = {}  # by replica

    def to(self, replica: str, address: str) -> Line | None:
        if not address:
            return None
        line = self._lines.get(replica)
        if line is not None and line.address == address:
            if line.broken_at is None:
                return line
            if time.monotonic() - line.broken_at < RETRY_AFTER_S:
                return None
        if line is not None:
            line.close()
        line = self._lines[replica] = Line(replica, address, self._secret)
        return line

    def forget(self, replica: str) -> None:
        line = self._lines.pop(replica, None)
        if line is not None:
            line.close()

    def close(self) -> None:
        for line in self._lines.values():
            with contextlib.suppress(Exception):
                line.close()
        self._lines.clear()

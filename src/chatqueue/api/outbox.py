"""A queue's events for one front in another process, batched: what every request the front placed
here has pushed since the last batch, sent as one message on the front's channel (a cluster's
replica to its front over Ray, the core to each API server over a socket). Plain asyncio.

NOTE: why batches. Each message between Ray processes costs both ends a fraction of a millisecond
of Python; one a token a stream cost the replica and the front ~1.3 ms of CPU a token together,
24x the plain server's whole cost per token. The engine hands a step's events over at once
(HandOver), so one batch a step carries a token for every stream, and a request's unread tokens
are merged (RequestStream) when the channel falls behind.
"""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from chatqueue.api import RequestStream
from chatqueue.types import Event

# NOTE: a channel is one ongoing request to Serve: lingering longer would hold a replica's
# graceful shutdown (a scale-down) up that long once its last request is done.
LINGER_S = 5.0

Batch = list[tuple[str, list[Event]]]  # (the front's key of a request, its events in order)


def encode(batch: Batch) -> bytes:
    """A batch as the channel carries it: bytes, which Ray passes on without pickling again."""
    return pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL)


def decode(data: bytes) -> Batch:
    """Only ever a replica's own `encode`: both ends are this cluster's processes."""
    batch: Batch = pickle.loads(data)
    return batch


@dataclass
class _Entry:
    stream: RequestStream
    sent: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Outbox:
    """One front's requests on this replica, and the events they have waiting."""

    def __init__(self, *, forever: bool = False) -> None:
        """`forever`: `batches` goes on while no request is left too (a channel that costs
        nothing idle: the core's socket to an API server), rather than for `LINGER_S`."""
        self._forever = forever
        self._live: dict[str, _Entry] = {}
        self._ready: dict[str, None] = {}  # keys with events waiting, in the order they came
        self._wakeup = asyncio.Event()
        self._channel = 0  # the channel now taking batches: a newer one retires an older one

    def __len__(self) -> int:
        return len(self._live)

    def add(self, key: str, stream: RequestStream) -> None:
        self._live[key] = _Entry(stream)
        stream.on_push(lambda: self._mark(key))
        self._wakeup.set()

    async def until_sent(self, key: str) -> None:
        """Until the request's Finished has been handed to a channel. Leaving early (cancelled)
        forgets the request."""
        try:
            await asyncio.shield(self._live[key].sent)
        finally:
            self._live.pop(key, None)
            self._ready.pop(key, None)
            self._wakeup.set()

    def _mark(self, key: str) -> None:
        self._ready[key] = None
        self._wakeup.set()

    async def batches(self) -> AsyncIterator[Batch]:
        """Batches while this outbox has requests that are not yet finished and sent, and for
        `LINGER_S` after the last one (a request placed meanwhile finds the channel open, and
        its first token need not wait for the front to open another); then the channel ends."""
        self._channel += 1
        channel = self._channel
        idle_since: float | None = None
        loop = asyncio.get_running_loop()
        while channel == self._channel:
            if self._ready:
                batch, done = self._take()
                for entry in done:
                    if not entry.sent.done():
                        entry.sent.set_result(None)
                if batch:
                    yield batch
                continue
            if self._live or self._forever:
                idle_since = None
            elif idle_since is None:
                idle_since = loop.time()
            self._wakeup.clear()
            linger = None if idle_since is None else idle_since + LINGER_S - loop.time()
            if linger is not None and linger <= 0:
                return
            try:
                await asyncio.wait_for(self._wakeup.wait(), linger)
            except TimeoutError:
                return

    def _take(self) -> tuple[Batch, list[_Entry]]:
        batch: Batch = []
        done: list[_Entry] = []
        for key in self._ready:
            entry = self._live.get(key)
            if entry is None:
                continue
            events = entry.stream.take_ready()
            if events:
                batch.append((key, events))
            if entry.stream.finished is not None:
                done.append(entry)
        self._ready.clear()
        return batch, done

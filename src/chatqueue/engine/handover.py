"""Events from the engine thread to the event loop: one thread-safe hop a step, then handed to the
streams in slices."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from chatqueue.engine.sequence import Sequence
from chatqueue.types import Event, Finished

Outbox = list[tuple[Sequence, Event]]
DELIVERY_SLICE = 32  # events handed to streams per event-loop iteration


class HandOver:
    """`send` from any thread; the events reach each sequence's sink on the event loop, in
    order. `on_finished` sees every Finished event as it is delivered."""

    def __init__(self, on_finished: Callable[[Sequence, Finished], None] | None = None) -> None:
        self._on_finished = on_finished
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def send(self, outbox: Outbox) -> None:
        """From the engine thread: one hop to the event loop for a whole step's events."""
        if not outbox or self._loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody listens
            self._loop.call_soon_threadsafe(self.deliver, outbox)

    def deliver(self, outbox: Outbox) -> None:
        """On the event loop.

        NOTE: every stream woken here runs its SSE write in the same loop iteration, before the
        loop polls its sockets again. 256 streams woken at once kept /health (and new requests)
        waiting ~10 ms a step; handing the step's events over in slices lets the loop poll
        between them."""
        for seq, event in outbox[:DELIVERY_SLICE]:
            seq.sink.push(event)
            if isinstance(event, Finished) and self._on_finished is not None:
                self._on_finished(seq, event)
        if len(outbox) > DELIVERY_SLICE:
            assert self._loop is not None
            self._loop.call_soon(self.deliver, outbox[DELIVERY_SLICE:])

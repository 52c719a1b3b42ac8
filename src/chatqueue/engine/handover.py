"""Events from the engine thread to the event loop: one thread-safe hop at a time, then handed to
the streams a few streams per event-loop iteration."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable

from chatqueue.engine.sequence import Sequence
from chatqueue.types import Event, Finished

Outbox = list[tuple[Sequence, Event]]
DELIVERY_SLICE = 32  # streams handed their events per event-loop iteration


class HandOver:
    """`send` from any thread; the events reach each sequence's sink on the event loop, in
    order. `on_finished` sees every Finished event as it is delivered.

    NOTE: why streams, not steps. Every stream woken runs its SSE write in the next loop
    iteration, before the loop polls its sockets again; so each iteration hands over at most
    DELIVERY_SLICE streams' events. Events wait here per stream, in one queue for every step: when
    the loop falls behind the engine (256 streams at a few ms a step), a stream's tokens of several
    steps go out in one wake-up and one write, and an iteration still wakes at most
    DELIVERY_SLICE streams. A hand-over per step, each in slices, woke a slice of every step
    still queued in the same iteration: the loop's lag and the writes grew with how far behind
    it was."""

    def __init__(self, on_finished: Callable[[Sequence, Finished], None] | None = None) -> None:
        self._on_finished = on_finished
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        # id(seq) -> (seq, its events not delivered yet), oldest first; under the lock
        self._waiting: OrderedDict[int, tuple[Sequence, list[Event]]] = OrderedDict()
        self._is_drain_scheduled = False

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def send(self, outbox: Outbox) -> None:
        """From the engine thread: queue a step's events; one hop to the event loop, if none is
        on its way already."""
        if not outbox or self._loop is None:
            return
        with self._lock:
            for seq, event in outbox:
                entry = self._waiting.get(id(seq))
                if entry is None:
                    self._waiting[id(seq)] = (seq, [event])
                else:
                    entry[1].append(event)
            if self._is_drain_scheduled:
                return
            self._is_drain_scheduled = True
        with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody listens
            self._loop.call_soon_threadsafe(self._drain)

    def deliver(self, outbox: Outbox) -> None:
        """On the event loop: these events now, after whatever their sequences have queued."""
        for seq, event in outbox:
            with self._lock:
                entry = self._waiting.pop(id(seq), None)
            if entry is not None:
                self._push_all(seq, entry[1])
            self._push(seq, event)

    def _drain(self) -> None:
        """On the event loop: the next DELIVERY_SLICE streams' events; again next iteration if
        more wait."""
        with self._lock:
            taken = [
                self._waiting.popitem(last=False)[1]
                for _ in range(min(DELIVERY_SLICE, len(self._waiting)))
            ]
            more = self._is_drain_scheduled = bool(self._waiting)
        for seq, events in taken:
            self._push_all(seq, events)
        if more:
            assert self._loop is not None
            self._loop.call_soon(self._drain)

    def _push_all(self, seq: Sequence, events: list[Event]) -> None:
        for event in events:
            self._push(seq, event)

    def _push(self, seq: Sequence, event: Event) -> None:
        seq.sink.push(event)
        if isinstance(event, Finished) and self._on_finished is not None:
            self._on_finished(seq, event)

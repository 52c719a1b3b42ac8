"""The caller's end of one request: an async iterator of events, fed on the event loop by the
engine's hand-over (it is the engine's EventSink)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable
from types import TracebackType

from chatqueue.types import Event, Finished, Token


class RequestStream:
    """Events for one request, in order, ending with `Finished`.

    Consecutive tokens a slow reader has not taken yet are merged into one, so the buffer stays
    small however far behind the reader is; one more than `max_unread_tokens` behind is aborted.
    Closing the stream before `Finished` aborts the request: a client that went away is just
    another finish reason.
    """

    def __init__(
        self, request_id: str, *, on_abandon: Callable[[], None], max_unread_tokens: int = 4096
    ) -> None:
        self.request_id = request_id
        self._on_abandon = on_abandon
        self._max_unread_tokens = max_unread_tokens
        self.is_lagging = False
        self._events: deque[Event] = deque()
        # NOTE: a bare future rather than an asyncio.Event: a token a step for hundreds of
        # streams, and Event's set/clear/wait bookkeeping was a measurable part of each.
        self._waiter: asyncio.Future[None] | None = None
        self.finished: Finished | None = None  # set when Finished has been handed out
        self._is_closed = False
        self._on_push: Callable[[], None] | None = None

    def on_push(self, callback: Callable[[], None]) -> None:
        """Call `callback` after every event pushed from now on (and at once if events wait):
        for a reader that takes events in batches (`take_ready`) rather than awaiting them."""
        self._on_push = callback
        if self._events:
            callback()

    def push(self, event: Event) -> None:
        last = self._events[-1] if self._events else None
        if isinstance(event, Token) and isinstance(last, Token):
            merged = Token(
                last.text + event.text,
                last.num_tokens + event.num_tokens,
                last.logprobs + event.logprobs,
            )
            self._events[-1] = merged
            if merged.num_tokens > self._max_unread_tokens and not self.is_lagging:
                # NOTE: a reader this far behind holds a slot for nothing: cut it loose.
                self.is_lagging = True
                self._on_abandon()
        else:
            self._events.append(event)
        self._wake()
        if self._on_push is not None:
            self._on_push()

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> Event:
        if not await self._wait_ready():
            raise StopAsyncIteration
        event = self._events.popleft()
        if isinstance(event, Finished):
            self.finished = event
        return event

    async def batches(self) -> AsyncIterator[list[Event]]:
        """Every event waiting at each wake-up (unread tokens merged), until the end: a writer
        that sends each batch at once writes once a wake-up, however many events came."""
        while await self._wait_ready():
            yield self.take_ready()

    async def _wait_ready(self) -> bool:
        """Until an event waits (True), or none ever will (False)."""
        while not self._events:
            if self.finished is not None or self._is_closed:
                return False
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return True

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def take_ready(self) -> list[Event]:
        """Every event waiting now (unread tokens merged), without waiting for more."""
        events = list(self._events)
        self._events.clear()
        if events and isinstance(events[-1], Finished):
            self.finished = events[-1]
        return events

    async def collect(self) -> Finished:
        """Wait for the end; the whole text is in `Finished.text`."""
        async for event in self:
            if isinstance(event, Finished):
                return event
        raise AssertionError("stream ended without Finished")

    async def aclose(self) -> None:
        if self._is_closed:
            return
        self._is_closed = True
        self._wake()
        if self.finished is None and not any(isinstance(e, Finished) for e in self._events):
            self._on_abandon()

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

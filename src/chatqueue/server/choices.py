"""The choices of one OpenAI request: one RequestStream each (a prompt of a list, or one of `n`),
admitted together or not at all, read as one stream of (index, event)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from types import TracebackType

from chatqueue.api import QueueService, RequestStream
from chatqueue.errors import QueueFull
from chatqueue.types import Event, Finished


class Choices:
    def __init__(self, streams: Sequence[RequestStream]) -> None:
        assert streams, "a request has at least one choice"
        self.streams = list(streams)

    @property
    def request_id(self) -> str:
        return self.streams[0].request_id

    @classmethod
    async def admit(
        cls, cq: QueueService, submits: Sequence[Callable[[], Awaitable[RequestStream]]]
    ) -> Choices:
        """Submit every choice, once the queue has room for all of them; if one is refused even
        so (others arrived meanwhile), the ones admitted are aborted (they never take a slot)
        and the refusal is raised, saying how many places the request needed."""
        if len(submits) > 1:
            cq.check_room(len(submits))
        streams: list[RequestStream] = []
        try:
            for submit in submits:
                streams.append(await submit())
        except BaseException as exc:
            for stream in streams:
                await stream.aclose()
            if isinstance(exc, QueueFull) and len(submits) > 1:
                exc.message = (
                    f"{exc.message} This request has {len(submits)} choices: each is a sequence "
                    f"of its own and needs a place, {len(submits)} at once."
                )
            raise
        return cls(streams)

    async def batches(self) -> AsyncIterator[list[tuple[int, Event]]]:
        """Every choice's events as they come, each with its choice's index, in batches: what
        was waiting at each wake-up (see RequestStream.batches)."""
        if len(self.streams) == 1:
            async for events in self.streams[0].batches():
                yield [(0, event) for event in events]
            return
        queue: asyncio.Queue[tuple[int, list[Event] | None]] = asyncio.Queue()

        async def pump(index: int, stream: RequestStream) -> None:
            async for events in stream.batches():
                queue.put_nowait((index, events))
            queue.put_nowait((index, None))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(self.streams)]
        try:
            left = len(tasks)
            while left:
                batch: list[tuple[int, Event]] = []
                item = await queue.get()
                while True:
                    index, got = item
                    if got is None:
                        left -= 1
                    else:
                        batch += [(index, event) for event in got]
                    if queue.empty():
                        break
                    item = queue.get_nowait()
                if batch:
                    yield batch
        finally:
            for task in tasks:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*tasks, return_exceptions=True)

    async def collect(self) -> list[Finished]:
        """Each choice's end, in index order."""
        return list(await asyncio.gather(*(s.collect() for s in self.streams)))

    async def aclose(self) -> None:
        for stream in self.streams:
            await stream.aclose()

    async def __aenter__(self) -> Choices:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

"""The front's placement (chatqueue.cluster.queue.ClusterQueue) against scripted replicas, with
no Ray running: who is asked, in what order, and what the client hears."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from ray.exceptions import RayActorError

from chatqueue.api import RequestStream
from chatqueue.api import outbox as outbox_module
from chatqueue.api.outbox import Outbox, encode
from chatqueue.api.wire import Admitted, Description, Refused, Submission
from chatqueue.cluster.policy import RouteHint
from chatqueue.cluster.queue import ClusterQueue
from chatqueue.config import Settings
from chatqueue.engine.mock import MockTokenizer
from chatqueue.errors import InvalidRequest, QueueFull, ReplicaLost, UserQueueFull
from chatqueue.types import (
    ChatMessage,
    Event,
    Finished,
    FinishReason,
    Queued,
    Started,
    Token,
    Usage,
)

HI = [ChatMessage("user", "hi")]


@dataclass
class Replica:
    """What a scripted replica answers: a refusal, or an admission, and then these events on the
    front's channel (through a real Outbox, as a replica sends them)."""

    name: str
    refusal: Exception | None = None
    waiting: int = 0
    rate: float | None = None
    dies_after_first_token: bool = False
    events: list[Event | None] = field(  # None: wait there until `go` is set
        default_factory=lambda: [
            Started(0.0),
            Token("hi"),
            Finished(FinishReason.STOP, Usage(1, 1), "hi"),
        ]
    )
    outboxes: dict[str, Outbox] = field(default_factory=dict)
    died: asyncio.Event = field(default_factory=asyncio.Event)
    aborted: asyncio.Event = field(default_factory=asyncio.Event)
    go: asyncio.Event = field(default_factory=asyncio.Event)

    async def submit(self, submission: Submission) -> AsyncIterator[Any]:
        if self.refusal is not None:
            assert isinstance(self.refusal, QueueFull | InvalidRequest)
            yield Refused(self.name, self.refusal, self.waiting, self.rate)
            return
        stream = RequestStream(f"req-{self.name}", on_abandon=self.aborted.set)
        outbox = self.outboxes.setdefault(submission.front, Outbox())
        outbox.add(submission.key, stream)
        yield Admitted(self.name, stream.request_id)
        feeding = asyncio.create_task(self._feed(stream))
        async with stream:
            sent = asyncio.create_task(outbox.until_sent(submission.key))
            await asyncio.wait(
                {sent, asyncio.create_task(self.died.wait())}, return_when="FIRST_COMPLETED"
            )
            if self.died.is_set():
                sent.cancel()
                raise RayActorError()
        await feeding

    async def _feed(self, stream: RequestStream) -> None:
        for event in self.events:
            if event is None:
                await self.go.wait()
                continue
            stream.push(event)
            await asyncio.sleep(0)
            if self.dies_after_first_token and isinstance(event, Token):
                self.died.set()
                return

    async def channel(self, front: str, only: str | None) -> AsyncIterator[bytes]:
        outbox = self.outboxes.get(front)
        if outbox is None or only != self.name:
            return
        async for batch in outbox.batches():
            yield encode(batch)
            if self.died.is_set():
                raise RayActorError()


class Call:
    def __init__(self, events: AsyncIterator[Any]) -> None:
        self._events = events
        self.is_cancelled = False

    def __aiter__(self) -> Call:
        return self

    async def __anext__(self) -> Any:
        return await self._events.__anext__()

    def cancel(self) -> None:
        self.is_cancelled = True
        task = asyncio.ensure_future(self._events.aclose())  # type: ignore[attr-defined]
        task.add_done_callback(lambda _: None)


@dataclass
class Handle:
    """Serve's handle as the front uses it; it routes as the router does: the replicas in
    order, none that refused this request, and the tried ones again once none is left; a
    channel to the replica it names."""

    replicas: list[Replica]
    asked: list[str] = field(default_factory=list)
    method: str = ""

    def options(self, **_: Any) -> Handle:
        return self

    @property
    def submit(self) -> Handle:
        return Handle(self.replicas, self.asked, "submit")

    @property
    def events(self) -> Handle:
        return Handle(self.replicas, self.asked, "events")

    @property
    def describe(self) -> Any:
        class Describe:
            @staticmethod
            async def remote() -> Description:
                return Description("mock", 2048, MockTokenizer(), 2, 2)

        return Describe

    def remote(self, first: Any, *, route: RouteHint) -> Call:
        if self.method == "events":
            replica = next(r for r in self.replicas if r.name == route.only)
            return Call(replica.channel(first, route.only))
        left = [r for r in self.replicas if r.name not in route.tried]
        replica = (left or self.replicas)[0]
        self.asked.append(replica.name)
        return Call(replica.submit(first))


async def queue_over(*replicas: Replica) -> tuple[ClusterQueue, Handle]:
    handle = Handle(list(replicas))
    queue = ClusterQueue(handle, Settings(engine="mock"), "test")  # type: ignore[arg-type]
    await queue.start_queue_worker()
    await queue.wait_ready(5)
    return queue, handle


def full(name: str, *, waiting: int = 0, rate: float | None = None) -> Replica:
    return Replica(name, QueueFull("full", retry_after_s=1), waiting, rate)


async def test_a_refusal_sends_the_request_to_the_next_replica_before_the_client_hears() -> None:
    queue, handle = await queue_over(full("a"), Replica("b"))
    stream = await queue.submit(HI)
    finished = await stream.collect()
    assert finished.reason is FinishReason.STOP and finished.text == "hi"
    assert handle.asked == ["a", "b"]
    await queue.stop(1)


async def test_429_only_once_every_replica_refused_with_retry_after_from_their_drain() -> None:
    queue, handle = await queue_over(full("a", waiting=3, rate=0.5), full("b", waiting=5, rate=0.5))
    with pytest.raises(QueueFull) as refused:
        await queue.submit(HI)
    assert handle.asked == ["a", "b", "a"]  # the last: none left but the tried
    # one completion at 1/s together is 1 s; draining the 8 waiting (and this one) 9 s
    assert 1 <= (refused.value.retry_after_s or 0) <= 9
    assert "Every replica" in refused.value.message
    await queue.stop(1)


async def test_a_bad_request_is_refused_at_once_without_asking_another() -> None:
    queue, handle = await queue_over(
        Replica("a", InvalidRequest("no", param="messages")), Replica("b")
    )
    with pytest.raises(InvalidRequest):
        await queue.submit(HI)
    assert handle.asked == ["a"]
    await queue.stop(1)


async def test_a_replica_that_dies_mid_stream_ends_it_with_replica_lost() -> None:
    queue, _ = await queue_over(Replica("a", dies_after_first_token=True))
    stream = await queue.submit(HI)
    async with asyncio.timeout(5):
        finished = await stream.collect()
    assert finished.reason is FinishReason.ERROR
    assert isinstance(finished.error, ReplicaLost) and finished.text == "hi"
    await queue.stop(1)


async def test_a_client_that_goes_away_cancels_its_call_and_the_replica_aborts() -> None:
    a = Replica("a", events=[Queued(1, None), None])
    queue, _ = await queue_over(a)
    stream = await queue.submit(HI)
    async with asyncio.timeout(5):
        assert isinstance(await stream.__anext__(), Queued)
        await stream.aclose()
        await a.aborted.wait()
    await queue.stop(1)


async def test_the_per_user_waiting_cap_counts_across_replicas() -> None:
    """A user with one request waiting on replica a may not queue another on replica b; once
    the first has started, the next is taken."""
    a = Replica("a", events=[Queued(1, None), None, Started(0.1), Token("hi"), None])
    b = Replica("b")
    queue, handle = await queue_over(a, b)
    first = await queue.submit(HI, user="u", max_queue_per_user=1)
    async with asyncio.timeout(5):
        assert isinstance(await first.__anext__(), Queued)
        with pytest.raises(UserQueueFull):
            await queue.submit(HI, user="u", max_queue_per_user=1)
        assert handle.asked == ["a"], "refused by the front, without asking a replica"
        handle.replicas.reverse()  # b first from now: a holds its request
        other = await queue.submit(HI, user="someone else", max_queue_per_user=1)
        assert (await other.collect()).text == "hi"
        a.go.set()
        assert isinstance(await first.__anext__(), Started)
        second = await queue.submit(HI, user="u", max_queue_per_user=1)
        assert (await second.collect()).text == "hi"
    await queue.stop(0)


async def test_one_channel_message_carries_every_streams_events(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The outbox batches: what several requests pushed since the last batch goes as one
    message, a slow channel's unread tokens merged. Once every request's end has been sent the
    channel lingers (a request placed meanwhile goes on it), then ends."""
    outbox = Outbox()
    streams = [RequestStream(f"r{i}", on_abandon=lambda: None) for i in range(3)]
    for i, stream in enumerate(streams):
        outbox.add(f"k{i}", stream)
    for stream in streams:
        stream.push(Token("a"))
        stream.push(Token("b"))
    batches = outbox.batches()
    batch = await batches.__anext__()
    assert batch == [(f"k{i}", [Token("ab", 2)]) for i in range(3)]
    sent = [asyncio.create_task(outbox.until_sent(f"k{i}")) for i in range(3)]
    for stream in streams:
        stream.push(Finished(FinishReason.STOP, Usage(1, 2), "ab"))
    batch = await batches.__anext__()
    assert [key for key, _ in batch] == ["k0", "k1", "k2"]
    async with asyncio.timeout(5):
        await asyncio.gather(*sent)
        late = RequestStream("late", on_abandon=lambda: None)
        outbox.add("late", late)
        late.push(Token("c"))
        assert await batches.__anext__() == [("late", [Token("c")])]
        late.push(Finished(FinishReason.STOP, Usage(1, 1), "c"))
        sent_late = asyncio.create_task(outbox.until_sent("late"))
        assert [key for key, _ in await batches.__anext__()] == ["late"]
        await sent_late
        monkeypatch.setattr(outbox_module, "LINGER_S", 0.0)
        assert [b async for b in batches] == []
    assert len(outbox) == 0

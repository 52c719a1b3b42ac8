"""The front's placement (chatqueue.cluster.queue.ClusterQueue) against scripted replicas, with
no Ray running: which replica is asked for which requests, in one call a replica a round, and
what the client hears."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from ray.exceptions import RayActorError

from chatqueue.api import RequestStream
from chatqueue.api import outbox as outbox_module
from chatqueue.api.outbox import Outbox, encode
from chatqueue.api.wire import Admitted, Description, Refused
from chatqueue.cluster import view
from chatqueue.cluster.policy import RouteHint
from chatqueue.cluster.queue import ClusterQueue
from chatqueue.cluster.stats import ReplicaStats
from chatqueue.cluster.wave import Wave, WaveAnswer
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
    """What a scripted replica answers a wave: a refusal, or an admission (no more than `slots`
    for a wave of slots only), and then these events on the front's channel (through a real
    Outbox, as a replica sends them). `view` is what the router shows the front of it."""

    name: str
    refusal: Exception | None = None
    waiting: int = 0
    rate: float | None = None
    slots: int = 2
    dies_after_first_token: bool = False
    events: list[Event | None] = field(  # None: wait there until `go` is set
        default_factory=lambda: [
            Started(0.0),
            Token("hi"),
            Finished(FinishReason.STOP, Usage(1, 1), "hi"),
        ]
    )
    view: ReplicaStats | None = None
    outboxes: dict[str, Outbox] = field(default_factory=dict)
    requests: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    died: asyncio.Event = field(default_factory=asyncio.Event)
    aborted: list[str] = field(default_factory=list)
    abort_seen: asyncio.Event = field(default_factory=asyncio.Event)
    go: asyncio.Event = field(default_factory=asyncio.Event)
    vanish: asyncio.Event = field(default_factory=asyncio.Event)  # set: its channel just ends

    def __post_init__(self) -> None:
        if self.view is None:
            self.view = figures(self.name)

    async def place(self, wave: Wave) -> WaveAnswer:
        outcomes: list[Admitted | Refused | None] = []
        room = self.slots
        for submission in wave.submissions:
            if wave.slots_only and room <= 0:
                outcomes.append(None)
            elif self.refusal is not None:
                assert isinstance(self.refusal, QueueFull | InvalidRequest)
                outcomes.append(Refused(self.name, self.refusal, self.waiting, self.rate))
            else:
                room -= 1
                outcomes.append(self._admit(wave.front, submission.key))
        return WaveAnswer(self.name, tuple(outcomes), None)

    def _admit(self, front: str, key: str) -> Admitted:
        stream = RequestStream(f"req-{key}", on_abandon=lambda: self._aborted(key))
        outbox = self.outboxes.setdefault(front, Outbox())
        outbox.add(key, stream)
        self.requests[key] = asyncio.create_task(self._follow(key, stream, outbox))
        return Admitted(self.name, stream.request_id)

    def _aborted(self, key: str) -> None:
        self.aborted.append(key)
        self.abort_seen.set()

    async def _follow(self, key: str, stream: RequestStream, outbox: Outbox) -> None:
        feeding = asyncio.create_task(self._feed(stream))
        try:
            async with stream:
                await outbox.until_sent(key)
        finally:
            feeding.cancel()

    async def abort(self, keys: list[str]) -> None:
        for key in keys:
            task = self.requests.get(key)
            if task is not None:
                task.cancel()

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

    async def channel(self, front: str) -> AsyncIterator[bytes]:
        outbox = self.outboxes.get(front)
        if outbox is None:
            return
        batches = outbox.batches()
        died = asyncio.create_task(self.died.wait())
        vanished = asyncio.create_task(self.vanish.wait())
        while True:
            batch = asyncio.create_task(anext(batches, None))  # type: ignore[arg-type]
            await asyncio.wait({batch, died, vanished}, return_when="FIRST_COMPLETED")
            data = batch.result() if batch.done() else None
            if data is not None:
                yield encode(data)  # what it sent before it died
            elif batch.done():
                return
            batch.cancel()
            if self.died.is_set():
                raise RayActorError()
            if self.vanish.is_set():
                return


def figures(name: str, *, running: int = 0, waiting: int = 0) -> ReplicaStats:
    return ReplicaStats(
        replica=name, state="ready", running=running, waiting=waiting, max_concurrent=2,
        max_queue_size=2, drain_rate_per_s=None, tokens_per_s=0.0, admitted=0, sampled_at=0.0,
    )  # fmt: skip


class Remote:
    def __init__(self, run: Callable[..., Any]) -> None:
        self.remote = run


@dataclass
class Handle:
    """Serve's handle as the front uses it: each call goes to the replica its route names (a
    gone one: another one answers, as the router sends it), and the test sees every wave."""

    replicas: list[Replica]
    waves: list[tuple[str, int, bool]] = field(default_factory=list)  # (replica, size, slots)
    aborts: list[tuple[str, list[str]]] = field(default_factory=list)
    hold: asyncio.Event | None = None  # set: waves wait for it
    arrived: asyncio.Event = field(default_factory=asyncio.Event)  # a wave came

    def options(self, **_: Any) -> Handle:
        return self

    def _named(self, route: RouteHint) -> Replica:
        return next((r for r in self.replicas if r.name == route.only), self.replicas[0])

    @property
    def place(self) -> Remote:
        async def run(wave: Wave, *, route: RouteHint) -> WaveAnswer:
            replica = self._named(route)
            self.waves.append((replica.name, len(wave.submissions), wave.slots_only))
            self.arrived.set()
            if self.hold is not None:
                await self.hold.wait()
            return await replica.place(wave)

        return Remote(run)

    @property
    def abort(self) -> Remote:
        async def run(front: str, keys: list[str], *, route: RouteHint) -> None:
            self.aborts.append((str(route.only), keys))
            await self._named(route).abort(keys)

        return Remote(run)

    @property
    def events(self) -> Remote:
        def run(front: str, *, route: RouteHint) -> AsyncIterator[bytes]:
            replica = self._named(route)
            return Call(replica.channel(front) if replica.name == route.only else _nothing())

        return Remote(run)

    @property
    def describe(self) -> Remote:
        async def run() -> Description:
            return Description("mock", 2048, MockTokenizer(), 2, 2)

        return Remote(run)

    def replica_stats(self) -> list[tuple[str, ReplicaStats | None]]:
        return [(r.name, r.view) for r in self.replicas]


async def _nothing() -> AsyncIterator[bytes]:
    return
    yield b""


class Call:
    def __init__(self, events: AsyncIterator[Any]) -> None:
        self._events = events

    def __aiter__(self) -> Call:
        return self

    async def __anext__(self) -> Any:
        return await self._events.__anext__()

    def cancel(self) -> None:
        task = asyncio.ensure_future(self._events.aclose())  # type: ignore[attr-defined]
        task.add_done_callback(lambda _: None)


async def queue_over(*replicas: Replica) -> tuple[ClusterQueue, Handle]:
    handle = Handle(list(replicas))
    view.publish("test", handle)
    queue = ClusterQueue(handle, Settings(engine="mock"), "test")  # type: ignore[arg-type]
    await queue.start_queue_worker()
    await queue.wait_ready(5)
    return queue, handle


def full(name: str, *, waiting: int = 0, rate: float | None = None) -> Replica:
    return Replica(name, QueueFull("full", retry_after_s=1), waiting, rate, slots=0)


def asked(handle: Handle) -> list[str]:
    return [replica for replica, _, _ in handle.waves]


async def test_a_refusal_sends_the_request_to_the_next_replica_before_the_client_hears() -> None:
    """a's figures say it has free slots; it has none, so b is asked next, for a free slot."""
    queue, handle = await queue_over(full("a"), Replica("b"))
    stream = await queue.submit(HI)
    finished = await stream.collect()
    assert finished.reason is FinishReason.STOP and finished.text == "hi"
    assert handle.waves == [("a", 1, True), ("b", 1, True)]
    await queue.stop(1)


async def test_429_only_once_every_replica_refused_with_retry_after_from_their_drain() -> None:
    queue, handle = await queue_over(full("a", waiting=3, rate=0.5), full("b", waiting=5, rate=0.5))
    with pytest.raises(QueueFull) as refused:
        await queue.submit(HI)
    # free slots first, then queue places, every replica asked for each
    assert handle.waves == [("a", 1, True), ("b", 1, True), ("a", 1, False), ("b", 1, False)]
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
    assert asked(handle) == ["a"]
    await queue.stop(1)


async def test_requests_that_arrive_together_are_split_between_replicas_by_free_slots() -> None:
    """Four at once, two free slots on each replica: one call to each, two requests each."""
    queue, handle = await queue_over(Replica("a"), Replica("b"))
    streams = await asyncio.gather(*(queue.submit(HI) for _ in range(4)))
    assert sorted(handle.waves) == [("a", 2, True), ("b", 2, True)]
    async with asyncio.timeout(5):
        ends = [await s.collect() for s in streams]
    assert all(f.reason is FinishReason.STOP for f in ends)
    await queue.stop(1)


async def test_a_replica_takes_only_its_free_slots_and_the_rest_go_to_the_next() -> None:
    """a's figures say two free slots, it has one: of the two planned there it takes one, and
    the other goes to b in the next round, still for a free slot (nothing waits)."""
    queue, handle = await queue_over(Replica("a", slots=1), Replica("b"))
    streams = await asyncio.gather(*(queue.submit(HI) for _ in range(3)))
    assert sorted(handle.waves[:2]) == [("a", 2, True), ("b", 1, True)]
    assert handle.waves[2:] == [("b", 1, True)]
    async with asyncio.timeout(5):
        ends = [await s.collect() for s in streams]
    assert all(f.reason is FinishReason.STOP for f in ends)
    await queue.stop(1)


async def test_with_one_replica_a_wave_is_one_call_for_slots_and_places_alike() -> None:
    """No other replica could have a free slot: the wave asks for any place at once, and the
    replica takes what it has room for, running or waiting."""
    queue, handle = await queue_over(Replica("a", slots=1))
    streams = await asyncio.gather(*(queue.submit(HI) for _ in range(3)))
    assert handle.waves == [("a", 3, False)]
    async with asyncio.timeout(5):
        ends = [await s.collect() for s in streams]
    assert all(f.reason is FinishReason.STOP for f in ends)
    await queue.stop(1)


async def test_a_lone_request_leaves_at_once_and_those_behind_a_wave_go_together() -> None:
    """A request alone is placed in a wave of its own without waiting for company; requests
    that arrive while that wave is on its way go together in the next one."""
    queue, handle = await queue_over(Replica("a", slots=4), Replica("b", slots=4))
    handle.hold = asyncio.Event()
    lone = asyncio.create_task(queue.submit(HI))
    async with asyncio.timeout(5):
        await handle.arrived.wait()
    assert handle.waves == [("a", 1, True)]
    behind = [asyncio.create_task(queue.submit(HI)) for _ in range(3)]
    await asyncio.sleep(0)  # each reaches the placer (no waiting in between)
    handle.hold.set()
    async with asyncio.timeout(5):
        streams = await asyncio.gather(lone, *behind)
        ends = [await s.collect() for s in streams]
    assert all(f.reason is FinishReason.STOP for f in ends)
    assert len(handle.waves) == 3 and sum(size for _, size, _ in handle.waves[1:]) == 3
    await queue.stop(1)


async def test_a_replica_that_dies_mid_stream_ends_it_with_replica_lost() -> None:
    """Its channel breaks: the stream ends with what it got, and the next request goes to the
    other replica."""
    queue, handle = await queue_over(Replica("a", dies_after_first_token=True), Replica("b"))
    stream = await queue.submit(HI)
    async with asyncio.timeout(5):
        finished = await stream.collect()
    assert finished.reason is FinishReason.ERROR
    assert isinstance(finished.error, ReplicaLost) and finished.text == "hi"
    assert (await (await queue.submit(HI)).collect()).text == "hi"
    assert asked(handle) == ["a", "b"]
    await queue.stop(1)


async def test_a_replica_gone_from_the_routers_list_ends_its_streams() -> None:
    """a's channel ends, and the reopened one is answered by another replica (a is no longer
    listed): a's stream ends with replica_lost rather than wait for good."""
    a = Replica("a", events=[Started(0.0), Token("hi"), None])
    queue, handle = await queue_over(a, Replica("b"))
    stream = await queue.submit(HI)
    async with asyncio.timeout(5):
        assert isinstance(await stream.__anext__(), Started)
        handle.replicas.remove(a)
        a.vanish.set()
        finished = await stream.collect()
    assert isinstance(finished.error, ReplicaLost) and finished.text == "hi"
    await queue.stop(1)


async def test_clients_that_go_away_together_are_aborted_in_one_call() -> None:
    a = Replica("a", events=[Queued(1, None), None])
    queue, handle = await queue_over(a)
    streams = await asyncio.gather(queue.submit(HI), queue.submit(HI))
    async with asyncio.timeout(5):
        for stream in streams:
            assert isinstance(await stream.__anext__(), Queued)
        for stream in streams:
            await stream.aclose()
        while len(a.aborted) < 2:
            await a.abort_seen.wait()
            a.abort_seen.clear()
    assert len(handle.aborts) == 1 and len(handle.aborts[0][1]) == 2
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
        assert asked(handle) == ["a"], "refused by the front, without asking a replica"
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

"""The front's placement (chatqueue.cluster.queue.ClusterQueue) against scripted replicas, with
no Ray running: who is asked, in what order, and what the client hears."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from ray.exceptions import RayActorError

from chatqueue.cluster.policy import RouteHint
from chatqueue.cluster.queue import ClusterQueue
from chatqueue.cluster.wire import Admitted, Description, Refused, Submission
from chatqueue.config import Settings
from chatqueue.engine.mock import MockTokenizer
from chatqueue.errors import InvalidRequest, QueueFull, ReplicaLost
from chatqueue.types import ChatMessage, Finished, FinishReason, Started, Token, Usage

HI = [ChatMessage("user", "hi")]


@dataclass
class Replica:
    """What a scripted replica answers: a refusal, or an admission and these events."""

    name: str
    refusal: Exception | None = None
    waiting: int = 0
    rate: float | None = None
    dies_after_first_token: bool = False

    async def answer(self) -> AsyncIterator[Any]:
        if self.refusal is not None:
            assert isinstance(self.refusal, QueueFull | InvalidRequest)
            yield Refused(self.name, self.refusal, self.waiting, self.rate)
            return
        yield Admitted(self.name, f"req-{self.name}")
        yield Started(0.0)
        yield Token("hi")
        if self.dies_after_first_token:
            raise RayActorError()
        yield Finished(FinishReason.STOP, Usage(1, 1), text="hi")


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


@dataclass
class Handle:
    """Serve's handle as the front uses it; it routes as the router does: the replicas in
    order, none that refused this request, and the tried ones again once none is left."""

    replicas: list[Replica]
    asked: list[str] = field(default_factory=list)

    def options(self, **_: Any) -> Handle:
        return self

    @property
    def submit(self) -> Handle:
        return self

    @property
    def describe(self) -> Any:
        class Describe:
            @staticmethod
            async def remote() -> Description:
                return Description("mock", 2048, MockTokenizer(), 2, 2)

        return Describe

    def remote(self, submission: Submission, *, route: RouteHint) -> Call:
        left = [r for r in self.replicas if r.name not in route.tried]
        replica = (left or self.replicas)[0]
        self.asked.append(replica.name)
        return Call(replica.answer())


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

"""A reply is in the history from the moment it is admitted, kept as far as it got: a server
killed mid-reply leaves it there marked interrupted (never a user turn with no reply after it),
and a reply whose `done` a client received is in the store before that `done` was sent."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from chatqueue import ChatQueue, MockConfig, MockRunner
from chatqueue.chat import ChatService
from chatqueue.history.memory import MemoryStore
from chatqueue.history.types import ChatParams
from chatqueue.server.chat_stream import chat_events


@pytest.fixture
async def service() -> AsyncIterator[ChatService]:
    cq = ChatQueue(MockRunner(MockConfig(delay_s=0.001)))
    await cq.start_queue_worker()
    yield ChatService(cq, MemoryStore())
    await cq.stop()


async def test_the_reply_is_stored_before_it_streams(service: ChatService) -> None:
    reply = await service.start("c", "one two three", ChatParams())
    turns = await service.store.turns("c")
    assert [(t.role, t.content) for t in turns] == [("user", "one two three"), ("assistant", "")]
    assert turns[1].message_id == reply.message_id and turns[1].interrupted
    await reply.stream.aclose()


async def test_a_done_reply_is_stored_before_the_done_event(service: ChatService) -> None:
    reply = await service.start("c", "one two three", ChatParams())
    async for line in chat_events(reply.stream, on_done=reply.finish, on_token=reply.add_text):
        if line.startswith("event: done"):
            stored = (await service.store.turns("c"))[-1]
            assert stored.content == "one two three"
            assert not stored.interrupted and stored.finish_reason == "stop"
            break
    else:
        raise AssertionError("no done event")
    await reply.save()


async def test_what_streamed_is_stored_as_it_goes(service: ChatService) -> None:
    words = " ".join(f"w{i}" for i in range(200))
    reply = await service.start("c", words, ChatParams())
    reply.flush_every_s = 0.0  # every token: the test sees a write without waiting on a clock
    async for line in chat_events(reply.stream, on_done=reply.finish, on_token=reply.add_text):
        if line.startswith("event: token"):
            stored = (await service.store.turns("c"))[-1]
            if stored.content:
                assert words.startswith(stored.content) and stored.interrupted
                break
    await reply.stream.aclose()
    await reply.save()
    kept = (await service.store.turns("c"))[-1]
    assert kept.interrupted and kept.finish_reason == "abort" and words.startswith(kept.content)

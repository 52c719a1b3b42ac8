"""The HistoryStore contract: what every store must do. A test module runs it against its stores by
subclassing HistoryStoreContract as `Test...` and giving it a `store` fixture: tests/unit runs memory
and SQLite, tests/integration a real Redis."""

from __future__ import annotations

import pytest

from chatqueue.history import ChatParams, Feedback, HistoryStore, Turn
from chatqueue.types import ChatMessage


def conversation(request: pytest.FixtureRequest) -> str:
    return f"c-{request.node.name}"


class HistoryStoreContract:
    async def test_turns_come_back_in_order_with_their_fields(
        self, store: HistoryStore, request: pytest.FixtureRequest
    ) -> None:
        cid = conversation(request)
        params = ChatParams(temperature=0.2, top_k=5, max_tokens=9)
        turns = [
            Turn("user", "hello <b>"),
            Turn("assistant", "hi", finish_reason="stop", params=params),
            Turn("user", "more"),
            Turn("assistant", "par", interrupted=True, finish_reason="abort", params=params),
        ]
        for t in turns:
            await store.append(cid, t)
        assert await store.turns(cid) == turns
        assert await store.turns(cid + "-never-seen") == []

    async def test_conversations_are_apart(
        self, store: HistoryStore, request: pytest.FixtureRequest
    ) -> None:
        a, b = conversation(request) + "-a", conversation(request) + "-b"
        await store.append(a, Turn("user", "for a"))
        await store.append(b, Turn("user", "for b"))
        await store.clear(a)
        assert await store.turns(a) == []
        assert [t.content for t in await store.turns(b)] == ["for b"]

    async def test_truncate_keeps_the_first_turns(
        self, store: HistoryStore, request: pytest.FixtureRequest
    ) -> None:
        cid = conversation(request)
        for i in range(4):
            await store.append(cid, Turn("user" if i % 2 == 0 else "assistant", str(i)))
        await store.truncate(cid, 3)
        assert [t.content for t in await store.turns(cid)] == ["0", "1", "2"]
        await store.append(cid, Turn("assistant", "again"))
        assert [t.content for t in await store.turns(cid)] == ["0", "1", "2", "again"]
        await store.truncate(cid, 0)
        assert await store.turns(cid) == []

    async def test_params_per_session(
        self, store: HistoryStore, request: pytest.FixtureRequest
    ) -> None:
        sid = conversation(request)
        assert await store.params(sid) is None
        await store.set_params(sid, ChatParams(temperature=0.1))
        await store.set_params(sid, ChatParams(temperature=1.5, top_p=0.5, max_tokens=7))
        assert await store.params(sid) == ChatParams(temperature=1.5, top_p=0.5, max_tokens=7)
        assert await store.params(sid + "-other") is None

    async def test_feedback_keeps_prompt_and_params_and_the_last_word(
        self, store: HistoryStore, request: pytest.FixtureRequest
    ) -> None:
        mid = f"msg-{request.node.name}"
        prompt = (ChatMessage("system", "be brief"), ChatMessage("user", "hi"))
        first = Feedback(mid, "c1", True, "", "hello", prompt, ChatParams(temperature=0.3))
        await store.add_feedback(first)
        assert await store.feedback(mid) == first
        second = Feedback(mid, "c1", False, "wrong", "hello", prompt, None)
        await store.add_feedback(second)
        assert await store.feedback(mid) == second
        assert await store.feedback("msg-none") is None

    async def test_turns_appended_together_and_after_a_keep(
        self, store: HistoryStore, request: pytest.FixtureRequest
    ) -> None:
        cid = conversation(request)
        await store.append(cid, Turn("user", "q"), Turn("assistant", "a"))
        await store.append(cid, Turn("user", "q2"), Turn("assistant", "a2"))
        await store.append(cid, Turn("assistant", "a2 again"), keep=3)  # regenerate
        assert [t.content for t in await store.turns(cid)] == ["q", "a", "q2", "a2 again"]

    async def test_update_replaces_the_turn_with_the_same_message_id(
        self, store: HistoryStore, request: pytest.FixtureRequest
    ) -> None:
        cid = conversation(request)
        question, after = Turn("user", "q"), Turn("user", "next")
        reply = Turn("assistant", "", interrupted=True, finish_reason="abort")
        await store.append(cid, question, reply, after)
        done = Turn("assistant", "all of it", message_id=reply.message_id, finish_reason="stop")
        await store.update(cid, done)
        assert await store.turns(cid) == [question, done, after]
        await store.clear(cid)
        await store.update(cid, done)  # a reply to a conversation cleared meanwhile
        assert await store.turns(cid) == []

    async def test_delete_removes_the_conversation_and_its_feedback(
        self, store: HistoryStore, request: pytest.FixtureRequest
    ) -> None:
        cid = conversation(request)
        reply = Turn("assistant", "a")
        await store.append(cid, Turn("user", "q"), reply)
        await store.append(cid + "-other", Turn("user", "kept"))
        fb = Feedback(reply.message_id, cid, True, "", "a", (), None)
        other_fb = Feedback(f"msg-{cid}-other", cid + "-other", False, "", "b", (), None)
        await store.add_feedback(fb)
        await store.add_feedback(other_fb)
        await store.delete(cid)
        assert await store.turns(cid) == []
        assert await store.feedback(reply.message_id) is None
        assert [t.content for t in await store.turns(cid + "-other")] == ["kept"]
        assert await store.feedback(other_fb.message_id) == other_fb

    async def test_a_store_that_answers_says_it_is_available(self, store: HistoryStore) -> None:
        assert await store.is_available()

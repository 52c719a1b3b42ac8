"""The chat API in-process (httpx ASGITransport, the mock engine echoing the last message):
sessions, conversation ids, parameters, feedback, regenerate, context overflow, a full queue."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from chatqueue import ChatQueue
from chatqueue.config import Settings
from chatqueue.engine.mock import MockConfig, MockRunner
from chatqueue.server.app import create_app
from tests.support.chat import done_of, reply_text, sse_events

Events = list[tuple[str, dict[str, Any]]]


@asynccontextmanager
async def chat_app(
    tmp_path: Path, chat_queue: ChatQueue | None = None, **settings: Any
) -> AsyncIterator[FastAPI]:
    fields = {"engine": "mock", "mock_delay": 0.0, "history": "memory", "data_dir": tmp_path}
    app = create_app(Settings(**{**fields, **settings}), chat_queue=chat_queue)
    async with app.router.lifespan_context(app):
        yield app


def client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


async def chat(c: httpx.AsyncClient, message: str | None, **fields: Any) -> Events:
    body = {"message": message, **fields} if message is not None else fields
    res = await c.post("/chat", json=body)
    assert res.status_code == 200, res.text
    assert res.headers["content-type"].startswith("text/event-stream")
    return sse_events(res.text)


async def history(c: httpx.AsyncClient, **query: str) -> list[dict[str, Any]]:
    res = await c.get("/chat/history", params=query)
    assert res.status_code == 200, res.text
    messages: list[dict[str, Any]] = res.json()["messages"]
    return messages


def contents(messages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in messages]


async def test_a_reply_streams_and_the_conversation_is_kept(tmp_path: Path) -> None:
    async with chat_app(tmp_path) as app, client(app) as c:
        first = await chat(c, "hello there")
        assert reply_text(first) == "hello there"
        done = done_of(first)
        assert done["finish_reason"] == "stop" and done["dropped_turns"] == 0
        assert done["usage"]["completion_tokens"] == 2
        await chat(c, "and again")
        messages = await history(c)
        assert contents(messages) == [
            ("user", "hello there"),
            ("assistant", "hello there"),
            ("user", "and again"),
            ("assistant", "and again"),
        ]
        assert messages[1]["message_id"] == done["message_id"]
        assert not any(m["interrupted"] for m in messages)


async def test_two_sessions_never_see_each_others_history(tmp_path: Path) -> None:
    async with chat_app(tmp_path) as app, client(app) as alice, client(app) as bob:
        await chat(alice, "alice speaking")
        assert await history(bob) == []
        await chat(bob, "bob speaking")
        assert contents(await history(alice))[0] == ("user", "alice speaking")
        assert contents(await history(bob)) == [
            ("user", "bob speaking"),
            ("assistant", "bob speaking"),
        ]
        await bob.post("/chat/clear")
        assert await history(bob) == []
        assert len(await history(alice)) == 2


async def test_api_callers_go_on_by_conversation_id_and_cannot_make_one_up(tmp_path: Path) -> None:
    async with chat_app(tmp_path) as app:
        async with client(app) as once:  # a caller that keeps no cookies: a new client each time
            cid = done_of(await chat(once, "first"))["conversation_id"]
        async with client(app) as again:
            await chat(again, "second", conversation_id=cid)
            assert contents(await history(again, conversation_id=cid))[2] == ("user", "second")
            assert await history(again) == []  # its own session's conversation is another
            made_up = await again.post("/chat", json={"message": "x", "conversation_id": "c123.x"})
            assert made_up.status_code == 404
            assert made_up.json()["error"]["type"] == "not_found"
            assert made_up.json()["error"]["param"] == "conversation_id"


async def test_params_are_per_session_and_checked_against_the_limits(tmp_path: Path) -> None:
    async with chat_app(tmp_path) as app, client(app) as c, client(app) as other:
        for bad in ({"temperature": 2.5}, {"top_p": 0}, {"top_k": -1}, {"max_tokens": 0}):
            res = await c.put("/chat/params", json=bad)
            assert res.status_code == 400, bad
            assert res.json()["error"]["type"] == "invalid_request_error"
            assert res.json()["error"]["param"] == next(iter(bad))
        most = (await c.get("/chat/params")).json()["limits"]["max_tokens"][1]
        too_many = await c.put("/chat/params", json={"max_tokens": most + 1})
        assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "max_tokens"

        res = await c.put("/chat/params", json={"temperature": 0.0, "max_tokens": 2})
        assert res.status_code == 200
        assert (await c.get("/chat/params")).json()["params"] == {
            "temperature": 0.0,
            "top_p": 1.0,
            "top_k": 0,
            "max_tokens": 2,
        }
        assert (await other.get("/chat/params")).json()["params"]["max_tokens"] is None
        cut = await chat(c, "one two three four")
        assert reply_text(cut) == "one two"
        assert done_of(cut)["finish_reason"] == "length"
        assert reply_text(await chat(other, "one two three four")) == "one two three four"


async def test_chat_bodies_are_strict_about_types(tmp_path: Path) -> None:
    """No coercion between strings, numbers and booleans, as on the OpenAI route."""
    bad_bodies = [
        ("POST", "/chat", {"message": 5}, "message"),
        ("POST", "/chat", {"message": "hi", "regenerate": "yes"}, "regenerate"),
        ("POST", "/chat", {"message": "hi", "regenerate": 1}, "regenerate"),
        ("POST", "/chat", {"message": "hi", "conversation_id": 5}, "conversation_id"),
        ("POST", "/chat/clear", {"conversation_id": 5}, "conversation_id"),
        ("PUT", "/chat/params", {"temperature": "0.5"}, "temperature"),
        ("PUT", "/chat/params", {"top_k": 5.0}, "top_k"),
        ("PUT", "/chat/params", {"max_tokens": "5"}, "max_tokens"),
        ("PUT", "/chat/params", {"max_tokens": True}, "max_tokens"),
        ("POST", "/chat/feedback", {"message_id": "m", "like": 1}, "like"),
        ("POST", "/chat/feedback", {"message_id": 5, "like": True}, "message_id"),
        ("POST", "/chat/feedback", {"message_id": "m", "like": True, "comment": 5}, "comment"),
    ]
    async with chat_app(tmp_path) as app, client(app) as c:
        for method, path, body, field in bad_bodies:
            res = await c.request(method, path, json=body)
            assert res.status_code == 400, (path, body, res.text)
            assert res.json()["error"]["type"] == "invalid_request_error"
            assert res.json()["error"]["param"] == field, (path, body)
        res = await c.put("/chat/params", json={"temperature": 1, "top_p": 1})
        assert res.status_code == 200, res.text


async def test_feedback_is_stored_with_the_prompt_and_the_params(tmp_path: Path) -> None:
    async with chat_app(tmp_path, system_prompt="Be kind.") as app, client(app) as c:
        await c.put("/chat/params", json={"temperature": 0.3})
        await chat(c, "first question")
        mid = done_of(await chat(c, "second question"))["message_id"]
        res = await c.post(
            "/chat/feedback", json={"message_id": mid, "like": False, "comment": "meh"}
        )
        assert res.status_code == 200, res.text
        stored = await app.state.chat_service.store.feedback(mid)
        assert stored.like is False and stored.comment == "meh"
        assert stored.reply == "second question"
        assert [m.content for m in stored.prompt] == [
            "Be kind.",
            "first question",
            "first question",
            "second question",
        ]
        assert stored.params.temperature == 0.3
        unknown = await c.post("/chat/feedback", json={"message_id": "msg_x", "like": True})
        assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "not_found"


async def test_regenerate_replaces_the_last_reply(tmp_path: Path) -> None:
    async with chat_app(tmp_path) as app, client(app) as c:
        nothing = await c.post("/chat", json={"regenerate": True})
        assert nothing.status_code == 400
        first = done_of(await chat(c, "say it"))["message_id"]
        again = await chat(c, None, regenerate=True)
        assert reply_text(again) == "say it"
        messages = await history(c)
        assert contents(messages) == [("user", "say it"), ("assistant", "say it")]
        assert messages[1]["message_id"] == done_of(again)["message_id"] != first


async def test_a_long_conversation_drops_its_oldest_turns_and_says_so(tmp_path: Path) -> None:
    # 64 tokens of context, 16 kept for the reply: three 10-word exchanges (~48 tokens) fill it.
    small = ChatQueue(MockRunner(MockConfig(context_window=64)))
    async with chat_app(tmp_path, chat_queue=small, system_prompt="sys") as app, client(app) as c:
        dropped = []
        for i in range(5):
            message = " ".join([f"m{i}"] * 10)
            events = await chat(c, message)
            assert reply_text(events) == message  # the newest message is always in the prompt
            dropped.append(done_of(events)["dropped_turns"])
        assert dropped[0] == 0
        assert dropped[-1] >= 1
        assert dropped == sorted(dropped)
        assert len(await history(c)) == 10  # the history keeps everything; the prompt does not


async def test_a_full_queue_is_a_json_429_before_the_stream_and_keeps_no_message(
    tmp_path: Path,
) -> None:
    slow = ChatQueue(MockRunner(MockConfig(delay_s=0.05)), max_concurrent=1, max_queue_size=1)
    async with chat_app(tmp_path, chat_queue=slow) as app:
        clients = [client(app) for _ in range(3)]
        try:
            results = await asyncio.gather(
                *(c.post("/chat", json={"message": "a b c d e f"}) for c in clients)
            )
            refused = [
                (c, r) for c, r in zip(clients, results, strict=True) if r.status_code == 429
            ]
            assert sorted(r.status_code for r in results) == [200, 200, 429]
            c, res = refused[0]
            assert res.headers["content-type"].startswith("application/json")
            assert int(res.headers["Retry-After"]) >= 1
            assert res.json()["error"]["type"] == "queue_full"
            assert await history(c) == []
        finally:
            for c in clients:
                await c.aclose()


async def test_delete_removes_the_conversation_and_its_feedback(tmp_path: Path) -> None:
    async with chat_app(tmp_path) as app, client(app) as c:
        done = done_of(await chat(c, "forget me"))
        cid, mid = done["conversation_id"], done["message_id"]
        await c.post("/chat/feedback", json={"message_id": mid, "like": True})
        res = await c.post("/chat/delete")
        assert res.status_code == 200, res.text
        assert res.json()["deleted"] == cid
        store = app.state.chat_service.store
        assert await store.turns(cid) == [] and await store.feedback(mid) is None
        assert await history(c) == []
        assert done_of(await chat(c, "fresh"))["conversation_id"] != cid  # a new one begins


async def test_a_conversation_is_its_keys_alone(tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"sk-alice-1": {"name": "alice"}, "sk-bob-22": {"name": "bob"}}))
    alice, bob = {"Authorization": "Bearer sk-alice-1"}, {"Authorization": "Bearer sk-bob-22"}
    async with chat_app(tmp_path, api_keys=keys) as app, client(app) as c:
        c.headers.update(alice)
        done = done_of(await chat(c, "alice's secret"))
        cid, mid = done["conversation_id"], done["message_id"]
        async with client(app) as b:
            b.headers.update(bob)
            named = {"conversation_id": cid}
            refused = [
                await b.get("/chat/history", params=named),
                await b.post("/chat", json={"message": "mine now", **named}),
                await b.post("/chat/clear", json=named),
                await b.post("/chat/delete", json=named),
                await b.post("/chat/feedback", json={"message_id": mid, "like": False, **named}),
            ]
            for res in refused:
                assert res.status_code == 404, res.text
                assert res.json()["error"]["type"] == "not_found"
            made_up = await b.get("/chat/history", params={"conversation_id": "c1.x"})
            assert made_up.json() == refused[0].json()  # the same answer: existence not told
        # the same browser (cookie) with another key: not alice's conversation either
        c.headers.update(bob)
        assert await history(c) == []
        c.headers.update(alice)
        assert contents(await history(c, conversation_id=cid)) == [
            ("user", "alice's secret"),
            ("assistant", "alice's secret"),
        ]

"""The HistoryStore contract against a real Redis (memory and SQLite run it in
tests/unit/history/test_history_stores.py); the TTL; and a server whose Redis goes away and comes
back: 503 on /chat while it is gone, /v1 unaffected, /health says so, and it recovers by itself."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from chatqueue.history import HistoryStore, Turn, open_store
from chatqueue.history.redis import RedisStore
from tests.support.chat import chat, done_of
from tests.support.history_contract import HistoryStoreContract
from tests.support.http import COMPLETIONS, SAFETY_S
from tests.support.servers import Server, redis_process, redis_server, running_server

MOCK = ("--engine", "mock", "--mock-mode", "echo", "--mock-delay", "0")
QUICK_S = 3.0  # a 503 comes well within this (the store's timeouts are 0.5 s and 1 s)


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


@pytest.fixture(params=["redis"])
async def store(tmp_path: Path, redis_url: str) -> AsyncIterator[HistoryStore]:
    # Keys are unique per test, so the Redis shared by this module needs no flushing.
    s = open_store(redis_url, tmp_path)
    yield s
    await s.close()


class TestHistoryStore(HistoryStoreContract):
    pass


async def test_an_idle_conversation_expires_and_each_write_renews_it(redis_url: str) -> None:
    store = RedisStore(redis_url, ttl_s=1)
    try:
        await store.append("ttl-a", Turn("user", "short-lived"))
        started = time.monotonic()
        while await store.turns("ttl-a"):
            assert time.monotonic() - started < SAFETY_S, "never expired"
            await store.append("ttl-b", Turn("user", "written again and again"))
        assert time.monotonic() - started >= 0.9  # not before its time
        assert await store.turns("ttl-b")  # each write renewed it
    finally:
        await store.close()


def history_of(c: httpx.Client, cid: str) -> httpx.Response:
    return c.get("/chat/history", params={"conversation_id": cid})


def assert_history_unavailable(c: httpx.Client, server: Server, cid: str) -> None:
    started = time.monotonic()
    res = history_of(c, cid)
    assert time.monotonic() - started < QUICK_S
    assert res.status_code == 503, res.text
    assert res.json()["error"]["type"] == "history_unavailable"
    assert res.headers.get("connection") != "close"
    sent = c.post("/chat", json={"message": "while it is gone", "conversation_id": cid})
    assert sent.status_code == 503 and sent.json()["error"]["type"] == "history_unavailable"
    v1 = c.post(COMPLETIONS, json={"messages": [{"role": "user", "content": "still here"}]})
    assert v1.status_code == 200 and v1.json()["choices"][0]["message"]["content"] == "still here"
    health = c.get("/health")
    assert health.status_code == 200  # the model serves: /v1 works
    assert health.json() == {"status": "ok", "history": "unavailable"}


def test_redis_going_away_is_a_503_on_chat_only_and_it_recovers(tmp_path: Path) -> None:
    with (
        redis_process(tmp_path / "redis") as redis,
        running_server(*MOCK, "--history", redis.url, tmp_path=tmp_path) as server,
        httpx.Client(base_url=server.url, timeout=SAFETY_S) as c,
    ):
        cid = done_of(chat(c, "before"))["conversation_id"]
        redis.stop()
        assert_history_unavailable(c, server, cid)
        redis.start()  # same port, same append-only file; chatqueue is not restarted
        assert [m["content"] for m in history_of(c, cid).json()["messages"]] == ["before"] * 2
        chat(c, "after", conversation_id=cid)
        assert len(history_of(c, cid).json()["messages"]) == 4
        assert c.get("/health").json() == {"status": "ok"}


def test_a_frozen_redis_does_not_hold_a_request(tmp_path: Path) -> None:
    with (
        redis_process() as redis,
        running_server(*MOCK, "--history", redis.url, tmp_path=tmp_path) as server,
        httpx.Client(base_url=server.url, timeout=SAFETY_S) as c,
    ):
        cid = done_of(chat(c, "before"))["conversation_id"]
        redis.freeze()
        try:
            assert_history_unavailable(c, server, cid)
        finally:
            redis.thaw()
        assert history_of(c, cid).status_code == 200

"""--history-ttl in the stores that need no server, on a fake clock: a conversation idle longer
than the TTL is gone; any write keeps it. (Redis, on its own clock: tests/integration.)"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from chatqueue.history import HistoryStore, Turn
from chatqueue.history.memory import MemoryStore
from chatqueue.history.sqlite import SqliteStore

TTL_S = 100


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=["memory", "sqlite"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, clock: Clock
) -> AsyncIterator[HistoryStore]:
    s: HistoryStore
    if request.param == "memory":
        s = MemoryStore(ttl_s=TTL_S, clock=clock)
    else:
        s = SqliteStore(tmp_path / "h.sqlite3", ttl_s=TTL_S, clock=clock)
    yield s
    await s.close()


async def test_an_idle_conversation_is_removed_after_the_ttl(
    store: HistoryStore, clock: Clock
) -> None:
    await store.append("idle", Turn("user", "old"))
    await store.append("busy", Turn("user", "first"))
    clock.now += TTL_S - 1
    await store.append("busy", Turn("assistant", "kept alive by this write"))
    assert len(await store.turns("idle")) == 1  # not yet
    clock.now += 2
    assert await store.turns("idle") == []
    assert [t.content for t in await store.turns("busy")] == ["first", "kept alive by this write"]
    clock.now += TTL_S + 1
    assert await store.turns("busy") == []


async def test_an_update_counts_as_activity(store: HistoryStore, clock: Clock) -> None:
    reply = Turn("assistant", "")
    await store.append("c", Turn("user", "q"), reply)
    clock.now += TTL_S - 1
    await store.update("c", Turn("assistant", "done", message_id=reply.message_id))
    clock.now += TTL_S - 1
    assert [t.content for t in await store.turns("c")] == ["q", "done"]


async def test_expired_conversations_leave_the_sqlite_file(tmp_path: Path, clock: Clock) -> None:
    store = SqliteStore(tmp_path / "h.sqlite3", ttl_s=TTL_S, clock=clock)
    try:
        for i in range(5):
            await store.append(f"old{i}", Turn("user", "x" * 1000))
        clock.now += TTL_S + 1
        await store.append("new", Turn("user", "a write sweeps what expired"))
    finally:
        await store.close()
    with sqlite3.connect(tmp_path / "h.sqlite3") as db:
        rows = db.execute("SELECT DISTINCT conversation_id FROM turns").fetchall()
    assert rows == [("new",)]

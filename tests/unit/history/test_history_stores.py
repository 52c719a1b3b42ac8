"""The HistoryStore contract against the stores that need no server (memory and SQLite); the Redis
run is tests/integration/test_history_redis.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from chatqueue.history import HistoryStore, Turn, open_store
from tests.support.history_contract import HistoryStoreContract


@pytest.fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[HistoryStore]:
    s = open_store(request.param, tmp_path)
    yield s
    await s.close()


class TestHistoryStore(HistoryStoreContract):
    pass


async def test_sqlite_keeps_history_across_reopening(tmp_path: Path) -> None:
    first = open_store("sqlite", tmp_path)
    await first.append("c", Turn("user", "still here"))
    await first.close()
    again = open_store("sqlite", tmp_path)
    assert [t.content for t in await again.turns("c")] == ["still here"]
    await again.close()

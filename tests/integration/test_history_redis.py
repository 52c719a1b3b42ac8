"""The HistoryStore contract against a real Redis (memory and SQLite run it in
tests/unit/history/test_history_stores.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from chatqueue.history import HistoryStore, open_store
from tests.support.history_contract import HistoryStoreContract
from tests.support.servers import redis_server


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

"""/health asks the history store at most once a second while it answers, at every probe while it
does not, and at once after a request found it unavailable."""

from __future__ import annotations

import asyncio

from chatqueue.history.memory import MemoryStore
from chatqueue.server.ops import StoreHealth


class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.checks = 0
        self.is_up = True

    async def is_available(self) -> bool:
        self.checks += 1
        await asyncio.sleep(0)  # a real store answers later: callers overlap
        return self.is_up


async def test_probes_within_a_second_share_one_check() -> None:
    now = [0.0]
    store = CountingStore()
    health = StoreHealth(store, clock=lambda: now[0])
    answers = await asyncio.gather(*(health.is_available() for _ in range(50)))
    assert all(answers) and store.checks == 1
    now[0] = 0.9
    assert await health.is_available() and store.checks == 1
    now[0] = 1.0
    assert await health.is_available() and store.checks == 2


async def test_an_unavailable_store_is_asked_at_every_probe_until_it_is_back() -> None:
    now = [0.0]
    store = CountingStore()
    health = StoreHealth(store, clock=lambda: now[0])
    assert await health.is_available()
    store.is_up = False
    health.note_failure()  # a request just failed on it
    assert not await health.is_available()
    assert not await health.is_available()
    store.is_up = True
    assert await health.is_available()
    assert store.checks == 4

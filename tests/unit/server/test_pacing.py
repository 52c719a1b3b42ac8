"""Arrival pacing: a burst of POSTs enters the app a few per event-loop iteration, in order;
GETs are never held; a request cancelled while it waits gives its turn to the next."""

from __future__ import annotations

import asyncio

from starlette.types import Receive, Scope, Send

from chatqueue.server.pacing import ArrivalPacer


class IterationCounter:
    """Counts event-loop iterations: a callback that re-schedules itself runs once in each."""

    def __init__(self) -> None:
        self.count = 0
        self._running = True
        asyncio.get_running_loop().call_soon(self._tick)

    def _tick(self) -> None:
        self.count += 1
        if self._running:
            asyncio.get_running_loop().call_soon(self._tick)

    def stop(self) -> None:
        self._running = False


def scope(method: str, name: str) -> Scope:
    return {"type": "http", "method": method, "path": f"/{name}"}


async def nothing() -> dict[str, object]:
    return {}


async def ignore(message: object) -> None:
    return None


async def test_a_burst_enters_a_few_per_iteration_in_order_and_gets_are_not_held() -> None:
    entered: list[tuple[str, int]] = []
    counter = IterationCounter()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        entered.append((scope["path"], counter.count))

    pacer = ArrivalPacer(app, per_tick=3)
    posts = [asyncio.create_task(pacer(scope("POST", f"p{i}"), nothing, ignore)) for i in range(10)]
    await asyncio.sleep(0)  # the POSTs have all arrived and asked for their turn
    get = asyncio.create_task(pacer(scope("GET", "health"), nothing, ignore))
    await asyncio.gather(*posts, get)
    counter.stop()

    post_entries = [(path, i) for path, i in entered if path != "/health"]
    assert [path for path, _ in post_entries] == [f"/p{i}" for i in range(10)]
    per_iteration: dict[int, int] = {}
    for _, iteration in post_entries:
        per_iteration[iteration] = per_iteration.get(iteration, 0) + 1
    assert max(per_iteration.values()) == 3
    assert len(per_iteration) == 4  # 3 + 3 + 3 + 1
    health_at = next(i for path, i in entered if path == "/health")
    assert health_at < post_entries[-1][1]  # not behind the burst


async def test_a_request_cancelled_while_waiting_passes_its_turn_on() -> None:
    entered: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        entered.append(scope["path"])

    pacer = ArrivalPacer(app, per_tick=1)
    tasks = [asyncio.create_task(pacer(scope("POST", f"p{i}"), nothing, ignore)) for i in range(4)]
    await asyncio.sleep(0)
    tasks[1].cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert entered == ["/p0", "/p2", "/p3"]
    assert not pacer._waiting


async def test_zero_turns_pacing_off() -> None:
    entered: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        entered.append(scope["path"])

    pacer = ArrivalPacer(app, per_tick=0)
    await asyncio.gather(*(pacer(scope("POST", f"p{i}"), nothing, ignore) for i in range(50)))
    assert len(entered) == 50
    assert not pacer._is_tick_pending

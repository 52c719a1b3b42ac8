"""Arrival pacing: a burst of new requests is let into the app a few per event-loop iteration.

NOTE: why. Each new generation request costs the event loop a few tenths of a millisecond of
Python (routing, JSON, validation, admission) before its first await. Sixty-four arriving
together were all run in one loop iteration, and everything else waiting on the loop, /health
and the tokens of the streams already running, waited for all of them (14-33 ms on the GPU
benchmark). Letting at most `per_tick` in per iteration spreads the same work over several
iterations, so the loop polls its sockets between them. Requests keep their order; GET requests
(health, load, metrics, the page) are never held.
"""

from __future__ import annotations

import asyncio
from collections import deque

from starlette.types import ASGIApp, Receive, Scope, Send


class ArrivalPacer:
    def __init__(self, app: ASGIApp, per_tick: int) -> None:
        self.app = app
        self.per_tick = per_tick
        self._granted = 0  # requests let in since the last tick
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._is_tick_pending = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.per_tick > 0 and scope["type"] == "http" and scope["method"] == "POST":
            await self._turn()
        await self.app(scope, receive, send)

    async def _turn(self) -> None:
        loop = asyncio.get_running_loop()
        self._schedule_tick(loop)
        if self._granted < self.per_tick and not self._waiting:
            self._granted += 1
            return
        turn = loop.create_future()
        self._waiting.append(turn)
        await turn  # if cancelled, the future is too, and the tick skips it

    def _schedule_tick(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._is_tick_pending:
            self._is_tick_pending = True
            loop.call_soon(self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        """Runs once per loop iteration while requests arrive: lets the next few in."""
        self._is_tick_pending = False
        self._granted = 0
        while self._waiting and self._granted < self.per_tick:
            turn = self._waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                self._granted += 1
        if self._waiting or self._granted:
            self._schedule_tick(loop)

"""Operations routes: /health, /load and /metrics."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from chatqueue.api import QueueService
from chatqueue.history import HistoryStore
from chatqueue.server.auth import admin, keyring
from chatqueue.server.errors import headers_of

router = APIRouter(tags=["operations"])

STORE_CHECK_EVERY_S = 1.0


class StoreHealth:
    """The history store's state for /health: asked of the store at most once a second while it
    answers (and by one caller at a time), at every probe while it does not.

    NOTE: why. A load balancer may probe /health many times a second; a query to the store (a
    SQLite read on a worker thread, a Redis round trip) for each one made every probe slower
    (p50 +1.4 ms at a probe every 50 ms) for an answer that changes rarely."""

    def __init__(self, store: HistoryStore, clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._clock = clock
        self._lock = asyncio.Lock()
        self._checked_at: float | None = None
        self._is_available = True

    def note_failure(self) -> None:
        """A request just found the store unavailable: ask it again at the next probe."""
        self._is_available = False

    async def is_available(self) -> bool:
        if self._is_available and not self._is_stale():
            return True
        async with self._lock:
            if not self._is_available or self._is_stale():  # still to ask: nobody before us did
                self._is_available = await self._store.is_available()
                self._checked_at = self._clock()
        return self._is_available

    def _is_stale(self) -> bool:
        at = self._checked_at
        return at is None or self._clock() - at >= STORE_CHECK_EVERY_S


def _cq(request: Request) -> QueueService:
    cq: QueueService = request.app.state.chat_queue
    return cq


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """The model's state sets the status code: 200 while it serves (/v1 works). A history store
    that does not answer adds `"history": "unavailable"` (the /chat routes answer 503 then) but
    leaves a serving model's 200: the process is fine and needs no restart."""
    cq = _cq(request)
    last_exit = cq.last_model_exit  # before the state: the engine writes them the other way
    status = cq.health
    body: dict[str, Any] = {"status": "ok" if status == "ready" else status}
    headers: dict[str, str] = {}
    if status == "failed":
        body["error"] = str(cq.load_error)
    if last_exit is not None:
        body["last_model_exit"] = last_exit
    if (restarting := cq.unavailable_error()) is not None:
        headers = headers_of(restarting)
    history: StoreHealth | None = getattr(request.app.state, "history_health", None)
    if history is not None and not await history.is_available():
        body["history"] = "unavailable"
    return JSONResponse(body, status_code=200 if status == "ready" else 503, headers=headers)


@router.get("/load", dependencies=[Depends(admin)])
async def load(request: Request) -> dict[str, Any]:
    figures = (await _cq(request).load_now()).as_json()
    if keyring(request).has_admin_key:  # only the operator sees the process's insides
        figures["debug"] = {"tasks": len(asyncio.all_tasks()), "open_fds": _num_open_fds()}
    return figures


def _num_open_fds() -> int | None:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # not Linux
        return None


@router.get("/metrics", dependencies=[Depends(admin)])
async def metrics(request: Request) -> Response:
    figures = _cq(request).metrics
    await figures.refresh()
    return Response(generate_latest(figures.registry), media_type=CONTENT_TYPE_LATEST)

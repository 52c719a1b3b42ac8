"""Operations routes: /health, /load and /metrics."""

from __future__ import annotations

import dataclasses
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from chatqueue.chat_queue import ChatQueue
from chatqueue.engine.loop import EngineState

router = APIRouter(tags=["operations"])


def _cq(request: Request) -> ChatQueue:
    cq: ChatQueue = request.app.state.chat_queue
    return cq


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    cq = _cq(request)
    body: dict[str, Any] = {"status": "ok"}
    if cq.scheduler.is_closed:
        body = {"status": "shutting_down"}
    elif cq.state is EngineState.FAILED:
        body = {"status": "failed", "error": str(cq.load_error)}
    elif cq.state is not EngineState.READY:
        body = {"status": cq.state.value}
    return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)


@router.get("/load")
async def load(request: Request) -> dict[str, Any]:
    return dataclasses.asdict(_cq(request).load())


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(generate_latest(_cq(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)

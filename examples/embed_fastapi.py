"""chatqueue inside your own FastAPI app, the ChatStream way.

    .venv/bin/uvicorn examples.embed_fastapi:app --port 9000
    curl -N localhost:9000/chat -H 'content-type: application/json' \
         -d '{"messages": [{"role": "user", "content": "hello there"}]}'

Swap the MockRunner for `chatqueue.api.build.runner_for(Settings())` to serve the default model.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from chatqueue import ChatMessage, ChatQueue, FinishInfo, MockConfig, MockRunner

log = logging.getLogger("example")


def on_finish(info: FinishInfo) -> None:
    # stop, length, abort (the client went away) or error
    log.info("request %s ended: %s", info.request_id, info.reason.value)


chat_queue = ChatQueue(
    MockRunner(MockConfig(mode="echo", delay_s=0.05)),
    max_concurrent=2,  # ChatStream's num_of_concurrent_executions
    max_queue_size=5,
    on_finish=on_finish,
)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    await chat_queue.start_queue_worker()
    yield
    await chat_queue.stop()


app = FastAPI(lifespan=lifespan)


@app.post("/chat")
async def chat(request: Request) -> Response:
    """SSE events: queued {position, eta_s}, token {text}, done {...}, error {...}."""
    return await chat_queue.handle_chat_stream_request(request)


@app.get("/ask")
async def ask(q: str) -> dict[str, Any]:
    """Or drive the queue yourself: submit, then read typed events."""
    stream = await chat_queue.submit([ChatMessage("user", q)])
    finished = await stream.collect()
    return {"answer": finished.text, "finish_reason": finished.reason.value}


@app.get("/load")
async def load() -> dict[str, Any]:
    info = chat_queue.load()
    return {"processing": info.processing, "waiting": info.waiting}

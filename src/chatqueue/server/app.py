"""The turnkey app: `create_app(settings)` wires a ChatQueue into FastAPI."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from chatqueue import api
from chatqueue.api.build import chat_queue_for
from chatqueue.config import Settings
from chatqueue.engine.process import ModelProcess
from chatqueue.server import chat_routes, openai_routes, ops
from chatqueue.server.auth import Keyring
from chatqueue.server.embedding import ChatQueue
from chatqueue.server.errors import install_error_handlers
from chatqueue.server.headers import SecurityHeaders
from chatqueue.server.limits import BodySizeLimit
from chatqueue.server.pacing import ArrivalPacer
from chatqueue.server.ratelimit import Limiter, RateLimiter


def create_app(
    settings: Settings | None = None,
    *,
    chat_queue: api.QueueService | None = None,
    model_process: ModelProcess | None = None,
    rate_limiter: Limiter | None = None,
) -> FastAPI:
    """Raises KeyFileError (before anything starts) when the --api-keys file is bad. `chat_queue`:
    one made elsewhere (a test's, a cluster's front, an API server's); else one from the
    settings. `rate_limiter`: whose buckets --rate-limit takes from; else this process's."""
    settings = settings or Settings()
    keyring = Keyring.from_settings(settings)
    cq: api.QueueService = chat_queue or chat_queue_for(
        settings, ChatQueue, model_process=model_process
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await cq.start_queue_worker()
        try:
            yield
        finally:
            await cq.stop(settings.shutdown_timeout)
            await history.close()

    app = FastAPI(title="chatqueue", version="0.1.0", lifespan=lifespan)
    app.state.chat_queue = cq
    app.state.settings = settings
    app.state.keyring = keyring
    app.state.rate_limiter = rate_limiter or RateLimiter()
    install_error_handlers(app)
    app.include_router(openai_routes.router)
    app.include_router(ops.router)
    history = app.state.history = chat_routes.install(app, settings, cq)
    app.state.history_health = ops.StoreHealth(history)
    _install_limits(app, settings)
    return app


def _install_limits(app: FastAPI, settings: Settings) -> None:
    """Outermost: arrival pacing (before any other work is spent on a request), security headers
    and CORS (so that even a 413 carries them), then the body limit."""
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(SecurityHeaders)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "PUT", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=["Retry-After", "X-Conversation-Id", "X-Message-Id"],
        )
    app.add_middleware(ArrivalPacer, per_tick=settings.admit_per_tick)

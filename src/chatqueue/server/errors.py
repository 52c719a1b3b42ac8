"""Domain errors -> HTTP, in one table, and one error shape everywhere (OpenAI's):
{"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from chatqueue.errors import (
    Aborted,
    ChatQueueError,
    ClientGone,
    CoreLost,
    EngineError,
    EngineRestarted,
    Forbidden,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    QueueFull,
    RateLimited,
    ReplicaLost,
    ServiceUnavailable,
    StoreUnavailable,
    Unauthorized,
)
from chatqueue.types import Finished, FinishReason, Usage

log = logging.getLogger(__name__)

# The one table: each kind of error (and its subclasses, unless listed themselves) -> a status.
STATUS: dict[type[ChatQueueError], int] = {
    InvalidRequest: 400,  # PromptTooLong too
    Unauthorized: 401,
    Forbidden: 403,
    NotFound: 404,
    PayloadTooLarge: 413,
    QueueFull: 429,  # UserQueueFull too
    RateLimited: 429,
    ClientGone: 499,  # nginx's "client closed request": nobody reads it, the access log does
    EngineRestarted: 503,  # cut short by a model process restart: retrying works
    ReplicaLost: 503,  # a cluster replica died under it: the others take the retry
    CoreLost: 503,  # an API server's core died: a restarted server takes the retry
    EngineError: 500,
    Aborted: 500,
    ServiceUnavailable: 503,  # NotReady, ShuttingDown, QueueTimeout, StoreUnavailable too
    ChatQueueError: 500,
}


def status_of(exc: ChatQueueError) -> int:
    return next(STATUS[cls] for cls in type(exc).__mro__ if cls in STATUS)


def headers_of(exc: ChatQueueError) -> dict[str, str]:
    headers = {}
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(exc.retry_after_s)
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    return headers


def error_body(message: str, error_type: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": error_type}}


def error_json(exc: ChatQueueError) -> dict[str, Any]:
    return error_body(exc.message, exc.kind, exc.param)


def error_response(exc: ChatQueueError) -> JSONResponse:
    return JSONResponse(error_json(exc), status_code=status_of(exc), headers=headers_of(exc))


def error_of(finished: Finished) -> ChatQueueError | None:
    """Why a request ended without its answer (ERROR, or ABORT by the server or a lagging
    reader), or None if it ended well."""
    if finished.reason is FinishReason.ERROR or finished.reason is FinishReason.ABORT:
        return finished.error or Aborted()
    return None


def usage_json(usage: Usage) -> dict[str, Any]:
    """OpenAI's usage object; `cached_tokens`: prompt tokens found in the prefix cache."""
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


# The validator's own steps in an error's location, not fields of the body: the members of a
# union tried in turn ("str", "list[TextPart]", "function-after[...]"), model names.
_NOT_A_FIELD = re.compile(r"^(str|int|float|bool|none|[a-z-]+\[.*\]|[A-Z]\w*)$")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts: dict[str, None] = {}  # in order, once each: a union's members repeat the field
    param = None
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        where = ".".join(x for x in loc if not _NOT_A_FIELD.match(x))
        if err.get("type") == "json_invalid":
            parts["The body is not valid JSON."] = None
            continue
        if param is None or where.startswith(f"{param}."):  # the first field, most precisely
            param = where or None
        parts[f"{where}: {err.get('msg')}" if where else str(err.get("msg"))] = None
    return " ".join(parts) or "Invalid request.", param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ChatQueueError)
    async def _chatqueue(request: Request, exc: ChatQueueError) -> JSONResponse:
        if isinstance(exc, StoreUnavailable) and hasattr(request.app.state, "history_health"):
            request.app.state.history_health.note_failure()  # /health says so at once
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(
            error_body(str(exc.detail), kind), status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("Internal server error.", "server_error"), status_code=500)

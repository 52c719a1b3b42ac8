"""The chat product's API, what the page uses: POST /chat streams a reply (SSE `queued`, `token`,
`done`, `error`) and keeps the conversation; clear, delete, history, params and feedback
beside it.

Errors before the stream opens (queue full 429 with Retry-After, 503 (history unavailable too),
400, 404) are plain JSON error responses; once it is open, an `error` event. A conversation
named by id must be the caller's (chat_session.py): another's is a 404, as an unknown one is.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from starlette.middleware.sessions import SessionMiddleware

from chatqueue.api import QueueService
from chatqueue.chat import ChatService, Reply
from chatqueue.config import Settings
from chatqueue.errors import InvalidRequest, NotFound
from chatqueue.history import ChatParams, Feedback, HistoryStore, Turn, open_store
from chatqueue.server import sse
from chatqueue.server.auth import Caller, caller_of, identity
from chatqueue.server.chat_schemas import MAX_TOP_K, ChatIn, ConversationIn, FeedbackIn, ParamsIn
from chatqueue.server.chat_session import (
    SESSION_COOKIE,
    SESSION_MAX_AGE_S,
    ConversationIds,
    chat_session,
    owner_of,
    session_secret,
)
from chatqueue.server.chat_stream import chat_events
from chatqueue.server.origin import same_origin
from chatqueue.types import ChatMessage

log = logging.getLogger(__name__)

router = APIRouter(prefix="/chat", tags=["chat"])


def install(app: FastAPI, settings: Settings, chat_queue: QueueService) -> HistoryStore:
    """Add the chat routes, the session cookie and the page to `app`; returns the history store
    for the app's lifespan to close."""
    from chatqueue.web import mount_page

    secret = session_secret(settings)
    store = open_store(settings.history, settings.data_dir, ttl_s=settings.history_ttl)
    app.state.chat_service = ChatService(chat_queue, store, system_prompt=settings.system_prompt)
    app.state.conversation_ids = ConversationIds(secret)
    app.add_middleware(
        SessionMiddleware,
        secret_key=secret,
        session_cookie=SESSION_COOKIE,
        max_age=SESSION_MAX_AGE_S,
        same_site="lax",
    )
    # API keys when set; never a state change sent by another site's page
    app.include_router(router, dependencies=[Depends(identity), Depends(same_origin)])
    mount_page(app)
    return store


def _service(request: Request) -> ChatService:
    service: ChatService = request.app.state.chat_service
    return service


async def _params(service: ChatService, session_id: str) -> ChatParams:
    return await service.store.params(session_id) or ChatParams()


@router.post("", response_model=None)
async def chat(body: ChatIn, request: Request, who: Caller) -> sse.EventStreamResponse:
    session = chat_session(request, body.conversation_id, owner=owner_of(who))
    service = _service(request)
    reply = await service.start(
        session.conversation_id,
        body.message,
        await _params(service, session.session_id),
        # NOTE: as on /v1: a key's holder is the user the queue takes turns between, with the
        # key's priority and cap; without one, the session takes turns and the cap counts per
        # client address (a client that drops its cookie is a new session every time).
        user=who.user(session.session_id),
        priority=who.priority,
        max_queue_per_user=who.max_queue,
        cap_key=None if who.name is not None else caller_of(request, who),
        regenerate=body.regenerate,
    )
    headers = {"X-Conversation-Id": reply.conversation_id, "X-Message-Id": reply.message_id}
    return sse.EventStreamResponse(_events(reply), stream=reply.stream, headers=headers)


async def _events(reply: Reply) -> AsyncIterator[str]:
    try:
        async for line in chat_events(reply.stream, on_done=reply.finish, on_token=reply.add_text):
            yield line
    finally:
        # NOTE: when the client goes away (stop button, closed tab) this runs inside a cancelled
        # scope; shielded, so what was generated still reaches the history, marked interrupted.
        with anyio.CancelScope(shield=True):
            try:
                await reply.save()
            except Exception:
                log.exception("could not save reply %s", reply.message_id)


@router.post("/clear")
async def clear(
    request: Request, who: Caller, body: ConversationIn | None = None
) -> dict[str, Any]:
    session = chat_session(request, body.conversation_id if body else None, owner=owner_of(who))
    await _service(request).store.clear(session.conversation_id)
    return {"conversation_id": session.conversation_id}


@router.post("/delete")
async def delete(
    request: Request, who: Caller, body: ConversationIn | None = None
) -> dict[str, Any]:
    """The conversation and the feedback on its replies, gone; the session's current one (if
    it was this) starts afresh under a new id."""
    session = chat_session(request, body.conversation_id if body else None, owner=owner_of(who))
    await _service(request).store.delete(session.conversation_id)
    if request.session.get("conversation_id") == session.conversation_id:
        del request.session["conversation_id"]
    return {"deleted": session.conversation_id}


@router.get("/history")
async def history(
    request: Request, who: Caller, conversation_id: str | None = None
) -> dict[str, Any]:
    session = chat_session(request, conversation_id, owner=owner_of(who))
    turns = await _service(request).store.turns(session.conversation_id)
    return {"conversation_id": session.conversation_id, "messages": [_turn_out(t) for t in turns]}


def _turn_out(turn: Turn) -> dict[str, Any]:
    return {
        "message_id": turn.message_id,
        "role": turn.role,
        "content": turn.content,
        "interrupted": turn.interrupted,
        "finish_reason": turn.finish_reason,
        "created_at": turn.created_at,
    }


@router.get("/params")
async def get_params(request: Request) -> dict[str, Any]:
    session = chat_session(request)
    service = _service(request)
    return _params_out(service, await _params(service, session.session_id))


@router.put("/params")
async def put_params(body: ParamsIn, request: Request) -> dict[str, Any]:
    session = chat_session(request)
    service = _service(request)
    params = body.merged(await _params(service, session.session_id))
    most = service.chat_queue.token_budget.most_chat_reply_tokens
    if params.max_tokens is not None and params.max_tokens > most:
        raise InvalidRequest(
            f"max_tokens: at most {most} here (half the model's context, or the server's cap).",
            param="max_tokens",
        )
    await service.store.set_params(session.session_id, params)
    return _params_out(service, params)


def _params_out(service: ChatService, params: ChatParams) -> dict[str, Any]:
    budget = service.chat_queue.token_budget
    limits = {
        "temperature": [0, 2],
        "top_p": [0, 1],
        "top_k": [0, MAX_TOP_K],
        "max_tokens": [1, budget.most_chat_reply_tokens],
    }
    return {
        "params": dataclasses.asdict(params),
        "default_max_tokens": budget.chat_reply_tokens(None),
        "limits": limits,
    }


@router.post("/feedback")
async def feedback(body: FeedbackIn, request: Request, who: Caller) -> dict[str, Any]:
    session = chat_session(request, body.conversation_id, owner=owner_of(who))
    service = _service(request)
    turns = await service.store.turns(session.conversation_id)
    at = next((i for i, t in enumerate(turns) if t.message_id == body.message_id), None)
    if at is None or turns[at].role != "assistant":
        raise NotFound("There is no reply with this id in the conversation.", param="message_id")
    system = [ChatMessage("system", service.system_prompt)] if service.system_prompt else []
    prompt = (*system, *(t.message() for t in turns[:at]))
    await service.store.add_feedback(
        Feedback(
            message_id=body.message_id,
            conversation_id=session.conversation_id,
            like=body.like,
            comment=body.comment,
            reply=turns[at].content,
            prompt=prompt,
            params=turns[at].params,
        )
    )
    return {"message_id": body.message_id, "like": body.like}

"""OpenAI-compatible routes: /v1/chat/completions and /v1/completions (streamed and not),
/v1/models and /v1/models/{id}.

Both completion routes take one path: check the model, admit every choice (`Choices.admit`:
each choice is a sequence of its own, admitted together or not at all), then either stream
(`_stream`: queued-position comments, chunks, the finish, usage, `[DONE]`) or wait for the end.
Only the response objects differ (`openai_format`)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from chatqueue.api import QueueService, RequestStream
from chatqueue.errors import InvalidRequest, NotFound
from chatqueue.server import sse
from chatqueue.server.auth import Caller, caller_of, identity
from chatqueue.server.choices import Choices
from chatqueue.server.errors import error_json, error_of
from chatqueue.server.limits import check_num_messages
from chatqueue.server.openai_format import ChatBuilder, TextBuilder, total_usage
from chatqueue.server.schemas import ChatCompletionRequest, CompletionRequest, OpenAIRequest
from chatqueue.server.structured import request_grammar
from chatqueue.server.tool_format import ToolChatBuilder
from chatqueue.text.tool_calls import ToolCallFormat
from chatqueue.types import Event, Finished, Queued, SamplingParams, Started, Token

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(identity)])

Builder = ChatBuilder | ToolChatBuilder | TextBuilder


def chat_queue(request: Request) -> QueueService:
    cq: QueueService = request.app.state.chat_queue
    return cq


def _model_entry(cq: QueueService) -> dict[str, Any]:
    return {
        "id": cq.model_name,
        "object": "model",
        "created": 0,
        "owned_by": "chatqueue",
        "context_window": cq.context_window,  # as vLLM's max_model_len, under OpenAI's name
        "engine": cq.engine_info,  # runner, attention kernel, cache, dtype, CUDA graphs
    }


@router.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [_model_entry(chat_queue(request))]}


@router.get("/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request) -> dict[str, Any]:
    cq = chat_queue(request)
    if model_id != cq.model_name:
        raise NotFound(f"The model '{model_id}' does not exist.", param="model")
    return _model_entry(cq)


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, who: Caller
) -> sse.EventStreamResponse | JSONResponse:
    cq = chat_queue(request)
    _check_model(cq, body)
    check_num_messages(len(body.messages), request.app.state.settings.max_messages)
    messages = body.chat_messages()
    fmt = cq.tool_call_format
    params = _constrained(body.choice_params(body.num_logprobs, cq.sampling_defaults), body, fmt)
    tools = body.offered_tools
    kw = {**_admission(request, who, body), "tools": tools}
    choices = await Choices.admit(cq, [_bind(cq.submit, messages, p, kw) for p in params])
    builder: ChatBuilder = (
        ToolChatBuilder(choices.request_id, cq.model_name, n=body.num_choices, fmt=fmt)
        if tools
        else ChatBuilder(choices.request_id, cq.model_name, n=body.num_choices)
    )
    return await _respond(request, body, choices, builder, wants_logprobs=body.logprobs)


@router.post("/completions", response_model=None)
async def completions(
    body: CompletionRequest, request: Request, who: Caller
) -> sse.EventStreamResponse | JSONResponse:
    cq = chat_queue(request)
    _check_model(cq, body)
    if body.echo and body.logprobs is not None:
        raise InvalidRequest(
            "echo with logprobs is not supported: the prompt's logprobs are not computed.",
            param="echo",
        )
    kw = _admission(request, who, body)
    prompts = body.prompts
    params = _constrained(
        body.choice_params(body.logprobs, cq.sampling_defaults), body, cq.tool_call_format
    )
    choices = await Choices.admit(
        cq, [_bind(cq.submit_prompt, prompt, p, kw) for prompt in prompts for p in params]
    )
    echoes = [_echo(cq, prompt) if body.echo else "" for prompt in prompts for _ in params]
    builder = TextBuilder(choices.request_id, cq.model_name, n=body.num_choices, echoes=echoes)
    return await _respond(request, body, choices, builder, wants_logprobs=body.logprobs is not None)


def _constrained(
    params: list[SamplingParams], body: OpenAIRequest, fmt: ToolCallFormat
) -> list[SamplingParams]:
    grammar = request_grammar(body, fmt)
    return params if grammar is None else [replace(p, grammar=grammar) for p in params]


def _check_model(cq: QueueService, body: OpenAIRequest) -> None:
    if body.model and body.model != cq.model_name:
        raise InvalidRequest(
            f"The model '{body.model}' does not exist; this server serves '{cq.model_name}'.",
            param="model",
        )


def _admission(request: Request, who: Caller, body: OpenAIRequest) -> dict[str, Any]:
    """`submit`'s keywords: whom the request is for and how it queues."""
    return {
        "user": who.user(body.user),
        "priority": who.priority,
        "queue_timeout_s": body.queue_timeout,
        "max_queue_per_user": who.max_queue,
        # NOTE: without a key that names the caller, `user` is whatever the body says; the cap
        # counts per client address, which a request cannot change (`user` still takes turns).
        "cap_key": None if who.name is not None else caller_of(request, who),
    }


def _bind(
    submit: Callable[..., Awaitable[RequestStream]], prompt: Any, params: Any, kw: dict[str, Any]
) -> Callable[[], Awaitable[RequestStream]]:
    return lambda: submit(prompt, params, **kw)


def _echo(cq: QueueService, prompt: str | Sequence[int]) -> str:
    return prompt if isinstance(prompt, str) else cq.tokenizer.decode(prompt)


async def _respond(
    request: Request,
    body: OpenAIRequest,
    choices: Choices,
    builder: Builder,
    *,
    wants_logprobs: bool,
) -> sse.EventStreamResponse | JSONResponse:
    if body.stream:
        lines = _stream(choices, builder, include_usage=body.include_usage)
        return sse.EventStreamResponse(lines, stream=choices)
    async with choices:
        finished = await sse.unless_disconnected(request, choices.collect())
    for f in finished:
        error = error_of(f)
        if error is not None:
            raise error
    return JSONResponse(builder.completion(finished, wants_logprobs=wants_logprobs))


async def _stream(choices: Choices, builder: Builder, *, include_usage: bool) -> AsyncIterator[str]:
    """The SSE body. NOTE: one string (one write to the socket) per batch of events: a stream
    that fell behind sends its tokens of several steps at once, and its last token, its finish,
    the usage and `[DONE]` go out together; a write is a system call, and hundreds of streams
    make hundreds a step."""
    finished: dict[int, Finished] = {}
    async with choices:  # leaving early (client gone) aborts every choice
        async for batch in choices.batches():
            lines: list[str] = []
            for index, event in batch:
                if isinstance(event, Finished):
                    error = error_of(event)
                    if error is not None:
                        yield "".join([*lines, sse.data(error_json(error)), DONE])
                        return  # leaving aborts the other choices
                    finished[index] = event
                line = _line(builder, index, event)
                if line:
                    lines.append(line)
            if len(finished) == len(choices.streams):
                yield "".join([*lines, *_end(builder, finished, include_usage=include_usage)])
                return
            if lines:
                yield "".join(lines)
        yield "".join(_end(builder, finished, include_usage=include_usage))


DONE = "data: [DONE]\n\n"


def _line(builder: Builder, index: int, event: Event) -> str | None:
    """An event's SSE line (None: it has none)."""
    match event:
        case Queued(position, eta_s):
            if index != 0:  # the choices wait together: one position
                return None
            eta = "unknown" if eta_s is None else f"{eta_s:.1f}s"
            return sse.comment(f"queued position={position} eta={eta}")
        case Started():
            return builder.started_line(index)
        case Token(text, _, logprobs):
            return builder.token_line(index, text, logprobs)
        case Finished():
            return builder.finish_line(index, event)
    return None


def _end(builder: Builder, finished: dict[int, Finished], *, include_usage: bool) -> list[str]:
    """What follows the last event: the usage, if asked, and `[DONE]`."""
    if not include_usage:
        return [DONE]
    ended = [finished[i] for i in sorted(finished)]
    return [sse.data(builder.usage_chunk(total_usage(ended, builder.n))), DONE]

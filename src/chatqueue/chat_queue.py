"""The embedding API, the ChatStream way: create it, start its worker, hand it requests."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from chatqueue.engine.loop import Engine, EngineState, Job
from chatqueue.engine.runner import Runner
from chatqueue.engine.sequence import Sequence as GenSequence
from chatqueue.engine.stream import RequestStream
from chatqueue.errors import (
    InvalidRequest,
    NotReady,
    PromptTooLong,
    QueueFull,
    ServiceUnavailable,
    ShuttingDown,
)
from chatqueue.loop_lag import sample_loop_lag
from chatqueue.metrics import Metrics
from chatqueue.scheduler import Request, Scheduler
from chatqueue.types import ChatMessage, Finished, FinishReason, SamplingParams

if TYPE_CHECKING:
    from starlette.requests import Request as HttpRequest
    from starlette.responses import Response


@dataclass(frozen=True, slots=True)
class FinishInfo:
    """Handed to the `on_finish` callback when a request ends, whatever the reason."""

    request_id: str
    user: str
    reason: FinishReason
    finished: Finished


@dataclass(frozen=True, slots=True)
class LoadInfo:
    processing: int
    waiting: int
    max_processing: int
    max_waiting: int
    tokens_per_s: float
    mean_queue_wait_s: float | None
    drain_rate_per_s: float | None
    retry_after_s: int
    state: str


class ChatQueue:
    """A bounded request queue in front of a capped processing queue, over one model.

    `runner` is a ready Runner, or a callable that builds one on the engine thread (so a slow
    model load never blocks the event loop; until it is done, requests get 503 "loading").
    """

    def __init__(
        self,
        runner: Runner | Callable[[], Runner],
        *,
        max_concurrent: int = 8,
        max_queue_size: int = 64,
        max_queue_per_user: int | None = None,
        queue_timeout_s: float | None = None,
        step_timeout_s: float | None = None,
        max_tokens_cap: int | None = None,
        max_prompt_tokens: int | None = None,
        max_unread_tokens: int = 4096,
        on_finish: Callable[[FinishInfo], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._on_finish = on_finish
        self.queue_timeout_s = queue_timeout_s
        self.step_timeout_s = step_timeout_s
        self.max_tokens_cap = max_tokens_cap
        self.max_prompt_tokens = max_prompt_tokens
        self.max_unread_tokens = max_unread_tokens
        self._watchdog: asyncio.Task[None] | None = None
        self._lag_sampler: asyncio.Task[None] | None = None
        self.metrics = Metrics(clock=clock)
        self.scheduler = Scheduler(
            max_concurrent=max_concurrent,
            max_queue_size=max_queue_size,
            max_queue_per_user=max_queue_per_user,
        )
        self._engine = Engine(
            scheduler=self.scheduler,
            runner=runner,
            metrics=self.metrics,
            clock=clock,
            on_finished=self._finished,
        )
        self._rids = itertools.count(1)
        # NOTE: one thread tokenizes, so the engine thread never does and HF tokenizers are never
        # entered from two threads at once for encoding.
        self._tokenizer_pool = ThreadPoolExecutor(1, thread_name_prefix="chatqueue-tokenizer")
        self._is_started = False

    # -- life cycle -----------------------------------------------------------------------
    async def start_queue_worker(self) -> None:
        """Start the engine thread (which loads the model, if given a factory). Returns at once."""
        if not self._is_started:
            self._is_started = True
            self._engine.start(asyncio.get_running_loop())
            self._lag_sampler = asyncio.create_task(
                sample_loop_lag(lambda _, lag: self.metrics.loop_lag.observe(lag))
            )
            if self.step_timeout_s is not None:
                self._watchdog = asyncio.create_task(self._watch(self.step_timeout_s))

    async def _watch(self, step_timeout_s: float) -> None:
        """Fail what is in flight if a step hangs, rather than leave every client hanging."""
        while True:
            await asyncio.sleep(min(1.0, step_timeout_s / 4))
            self._engine.check_hung(self._clock(), step_timeout_s)

    async def wait_ready(self, timeout_s: float | None = None) -> None:
        """Wait for the model to load; raises NotReady if it failed or `timeout_s` passed."""
        await asyncio.to_thread(self._engine.loaded.wait, timeout_s)
        if self._engine.state is not EngineState.READY:
            raise NotReady(f"The model is not ready: {self._engine.load_error or 'loading'}")

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Stop admitting, let what is in flight finish for up to `timeout_s`, abort the rest."""
        self._engine.close_admission()
        for task in (self._watchdog, self._lag_sampler):
            if task is not None:
                task.cancel()
        if self._is_started:
            is_idle = await asyncio.to_thread(self._engine.wait_idle, timeout_s)
            if not is_idle:
                self._engine.abort_everything(
                    ShuttingDown("The server shut down before this request could finish.")
                )
            await asyncio.to_thread(self._engine.stop, 30.0)
        self._tokenizer_pool.shutdown(wait=False, cancel_futures=True)

    @property
    def state(self) -> EngineState:
        return self._engine.state

    @property
    def health(self) -> str:
        """ready, loading, failed, unhealthy (a step hangs) or shutting_down."""
        if self.scheduler.is_closed:
            return "shutting_down"
        if self._engine.is_hung:
            return "unhealthy"
        return self._engine.state.value

    @property
    def load_error(self) -> BaseException | None:
        return self._engine.load_error

    @property
    def is_ready(self) -> bool:
        return self._engine.state is EngineState.READY and not self.scheduler.is_closed

    @property
    def runner(self) -> Runner:
        if self._engine.state is EngineState.FAILED:
            raise ServiceUnavailable(f"The model is not available: {self._engine.load_error}")
        if self._engine.runner is None or self._engine.state is not EngineState.READY:
            raise NotReady("The model is still loading. Retry in a few seconds.")
        return self._engine.runner

    @property
    def model_name(self) -> str:
        return self.runner.model_name

    # -- requests -------------------------------------------------------------------------
    async def submit(
        self,
        messages: Sequence[ChatMessage],
        params: SamplingParams | None = None,
        *,
        user: str = "",
        priority: int = 0,
        queue_timeout_s: float | None = None,
        max_queue_per_user: int | None = None,
    ) -> RequestStream:
        """Admit a chat request; returns its event stream (async iterator), or raises the typed
        error that says why not (QueueFull: 429, ShuttingDown/NotReady: 503, PromptTooLong: 400).
        Close the stream (or leave its `async with`) to abort the request.

        `user` and `priority` order the queue (higher priority first, users in turn);
        `queue_timeout_s` may only lower the server's queue-wait deadline; `max_queue_per_user`
        replaces the server's cap on this user's waiting requests (an API key's own)."""
        arrival = self._clock()
        params = params or SamplingParams()
        runner = self._admission_precheck(arrival)
        prompt_ids = await self.encode(messages)
        if self.max_prompt_tokens is not None and len(prompt_ids) > self.max_prompt_tokens:
            raise InvalidRequest(
                f"The prompt is {len(prompt_ids)} tokens; this server takes at most "
                f"{self.max_prompt_tokens}.",
                param="messages",
            )
        max_new = self._max_new_tokens(len(prompt_ids), params, runner.context_window)
        timeouts = [t for t in (self.queue_timeout_s, queue_timeout_s) if t is not None]
        deadline = arrival + min(timeouts) if timeouts else None
        stream = RequestStream(
            f"chatcmpl-{uuid.uuid4().hex[:24]}",
            on_abandon=lambda: self._engine.abort(job),
            max_unread_tokens=self.max_unread_tokens,
        )
        request = Request(
            rid=next(self._rids),
            arrival=arrival,
            user=user,
            priority=priority,
            deadline=deadline,
            max_queue_per_user=max_queue_per_user,
        )
        job = Job(request, GenSequence(prompt_ids, params, max_new, runner.tokenizer), stream)
        try:
            self._engine.add(job, self._clock())
        except QueueFull as exc:
            self.metrics.rejected.labels(exc.error_type).inc()
            raise
        return stream

    async def encode(self, messages: Sequence[ChatMessage]) -> list[int]:
        """The prompt token ids for a conversation, computed on the tokenizer thread."""
        tokenizer = self.runner.tokenizer
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._tokenizer_pool, tokenizer.apply_chat_template, list(messages)
        )

    @property
    def context_window(self) -> int:
        return self.runner.context_window

    def _admission_precheck(self, now: float) -> Runner:
        """Refuse early what admission would refuse, before paying for tokenization."""
        if self.scheduler.is_closed:
            raise ShuttingDown("The server is shutting down and takes no new requests.")
        if self._engine.is_hung:
            raise ServiceUnavailable("The model is not responding. Retry later.")
        runner = self.runner
        s = self.scheduler
        if s.is_full:
            self.metrics.rejected.labels(QueueFull.error_type).inc()
            raise QueueFull(
                f"The server is at capacity ({s.max_concurrent} running, {s.max_queue_size} "
                "waiting). Retry later.",
                retry_after_s=s.retry_after(now),
            )
        return runner

    def _max_new_tokens(self, num_prompt: int, params: SamplingParams, context_window: int) -> int:
        cap = self.max_tokens_cap
        if cap is not None and params.max_tokens is not None and params.max_tokens > cap:
            raise InvalidRequest(
                f"max_tokens is {params.max_tokens}; this server allows at most {cap}.",
                param="max_tokens",
            )
        room = context_window - num_prompt
        wanted = params.max_tokens if params.max_tokens is not None else min(room, cap or room)
        if wanted < 1 or num_prompt + wanted > context_window:
            raise PromptTooLong(
                prompt_tokens=num_prompt, max_tokens=max(wanted, 1), context_window=context_window
            )
        return wanted

    def _finished(self, job: Job, finished: Finished) -> None:
        if self._on_finish is not None:
            self._on_finish(
                FinishInfo(job.stream.request_id, job.request.user, finished.reason, finished)
            )

    async def handle_chat_stream_request(self, request: HttpRequest) -> Response:
        """Turn a Starlette request (JSON: messages + sampling fields) into an SSE response of
        chat events: queued, token, done, error."""
        from chatqueue.server.chat_stream import chat_stream_response

        return await chat_stream_response(self, request)

    # -- figures --------------------------------------------------------------------------
    def load(self) -> LoadInfo:
        s = self.scheduler
        now = self._clock()
        return LoadInfo(
            processing=s.num_running,
            waiting=s.num_waiting,
            max_processing=s.max_concurrent,
            max_waiting=s.max_queue_size,
            tokens_per_s=round(self.metrics.tokens_per_s, 2),
            mean_queue_wait_s=self.metrics.mean_queue_wait_s,
            drain_rate_per_s=s.drain.rate(now),
            retry_after_s=s.retry_after(now),
            state=self.health,
        )


__all__ = ["ChatQueue", "FinishInfo", "LoadInfo", "ServiceUnavailable"]

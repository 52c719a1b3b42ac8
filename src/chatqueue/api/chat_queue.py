"""The embedding API, the ChatStream way: create it, start its worker, hand it requests.

A thin façade: admission is the scheduler's `check_room` and the `TokenBudget`; the engine runs
the steps off the event loop; each request's events come back on a RequestStream.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from chatqueue.api.admission import TokenBudget
from chatqueue.api.monitor import sample_loop_lag, watch_steps
from chatqueue.api.stream import RequestStream
from chatqueue.engine.loop import Engine, EngineState, RestartPolicy
from chatqueue.engine.overlap import OverlapMode
from chatqueue.engine.runner import Runner, runner_info
from chatqueue.engine.sequence import Sequence as EngineSequence
from chatqueue.errors import (
    InvalidRequest,
    NotReady,
    QueueFull,
    ServiceUnavailable,
    ShuttingDown,
)
from chatqueue.metrics import Metrics
from chatqueue.scheduler import Scheduler
from chatqueue.text.grammar import GrammarCompiler, GrammarMatcher
from chatqueue.text.tokenizer import TextTokenizer, Tokenizer
from chatqueue.text.tool_calls import ToolCallFormat
from chatqueue.text.tool_prompt import format_for, prompt_encoder
from chatqueue.types import ChatMessage, Finished, FinishReason, SamplingParams, ToolSpec

ABORT_GRACE_S = 0.5  # for the aborted requests' last step, once the grace period is over


@dataclass(frozen=True, slots=True)
class FinishInfo:
    """Handed to the `on_finish` callback when a request ends, whatever the reason."""

    request_id: str
    user: str
    reason: FinishReason
    finished: Finished


@dataclass(frozen=True, slots=True)
class Admission:
    """Who a request is for, and how it queues (`submit`'s keywords)."""

    user: str = ""
    priority: int = 0
    queue_timeout_s: float | None = None
    max_queue_per_user: int | None = None
    cap_key: str | None = None


def sampling_defaults_of(tokenizer: object) -> SamplingParams:
    """The sampling settings a tokenizer read from its model's generation config (HFTokenizer's
    `sampling_defaults`), else SamplingParams' own defaults."""
    defaults = getattr(tokenizer, "sampling_defaults", None)
    return defaults if isinstance(defaults, SamplingParams) else SamplingParams()


@dataclass(frozen=True, slots=True)
class LoadInfo:
    processing: int  # running now
    waiting: int
    max_concurrent: int
    max_queue_size: int
    tokens_per_s: float
    mean_queue_wait_s: float | None
    drain_rate_per_s: float | None
    retry_after_s: int
    state: str
    # the KV pool, when the runner has one (else None): blocks of kv_block_size tokens
    kv_block_size: int | None = None
    kv_blocks_total: int | None = None
    kv_blocks_used: int | None = None
    kv_blocks_free: int | None = None
    kv_tokens_live: int | None = None  # tokens the running requests hold (shared ones each time)
    prefix_hit_rate: float | None = None  # tokens found cached / tokens allocated, so far
    # what the runner's prefill budget has learned, where it has one (`PrefillBudget.describe`):
    # the prompt tokens a step may take beside decode follow from it
    prefill: dict[str, float | int | None] | None = None

    @property
    def max_processing(self) -> int:
        """Deprecated name of `max_concurrent`."""
        return self.max_concurrent

    @property
    def max_waiting(self) -> int:
        """Deprecated name of `max_queue_size`."""
        return self.max_queue_size

    def as_json(self) -> dict[str, Any]:
        """/load's body; `max_processing` and `max_waiting` are the deprecated names, kept."""
        body = {name: getattr(self, name) for name in self.__dataclass_fields__}
        return {**body, "max_processing": self.max_concurrent, "max_waiting": self.max_queue_size}


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
        max_model_restarts: int = 5,
        max_tokens_cap: int | None = None,
        max_prompt_tokens: int | None = None,
        max_unread_tokens: int = 4096,
        on_finish: Callable[[FinishInfo], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        tool_call_format: ToolCallFormat | None = None,
        stream_interval: int = 1,
        overlap_steps: OverlapMode = "auto",
    ) -> None:
        """`tool_call_format`: how the model writes tool calls; None: from its chat template.
        `stream_interval`: a stream's text goes out every this many tokens (first and last at
        once). `overlap_steps`: with the model in its own process, its next step runs while the
        last one's tokens are handled: on, off, or auto (engine.overlap)."""
        self._clock = clock
        self._on_finish = on_finish
        self.queue_timeout_s = queue_timeout_s
        self.step_timeout_s = step_timeout_s
        self.max_tokens_cap = max_tokens_cap
        self.max_prompt_tokens = max_prompt_tokens
        self.max_unread_tokens = max_unread_tokens
        self._tasks: list[asyncio.Task[None]] = []
        self.metrics = Metrics(clock=clock)
        self.scheduler: Scheduler[EngineSequence] = Scheduler(
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
            restart_policy=RestartPolicy(max_restarts=max_model_restarts),
            stream_interval=stream_interval,
            overlap_steps=overlap_steps,
        )
        self._rids = itertools.count(1)
        self._id_prefix = secrets.token_hex(6)  # request ids stay unique across restarts
        # NOTE: one thread tokenizes, so the engine thread never does and HF tokenizers are never
        # entered from two threads at once for encoding.
        self._tokenizer_pool = ThreadPoolExecutor(1, thread_name_prefix="chatqueue-tokenizer")
        # grammars compile on a thread of their own: a tokenizer's first (~1 s) must not hold
        # up every prompt's encoding
        self._grammar_pool = ThreadPoolExecutor(1, thread_name_prefix="chatqueue-grammar")
        self._grammars: GrammarCompiler | None = None
        self._tool_call_format = tool_call_format
        self._detected_format: tuple[Tokenizer, ToolCallFormat] | None = None
        self._is_started = False
        self._is_stopped = False

    # -- life cycle -----------------------------------------------------------------------
    async def start_queue_worker(self) -> None:
        """Start the engine thread (which loads the model, if given a factory). Returns at once."""
        if self._is_started:
            return
        self._is_started = True
        self._engine.start(asyncio.get_running_loop())
        lag = sample_loop_lag(lambda _, lag_s: self.metrics.loop_lag.observe(lag_s))
        self._tasks.append(asyncio.create_task(lag))
        fixed = self.step_timeout_s
        timeout = self._engine.step_timeout if fixed is None else (lambda: fixed)
        watch = watch_steps(self._engine.check_hung, self._clock, timeout)
        self._tasks.append(asyncio.create_task(watch))

    async def wait_ready(self, timeout_s: float | None = None) -> None:
        """Wait for the model to load; raises NotReady if it failed or `timeout_s` passed."""
        await asyncio.to_thread(self._engine.loaded.wait, timeout_s)
        if self._engine.state is not EngineState.READY:
            raise NotReady(f"The model is not ready: {self._engine.load_error or 'loading'}")

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Stop admitting, let what is in flight finish for up to `timeout_s`, abort the rest.
        A second call returns at once."""
        if self._is_stopped:
            return
        self._is_stopped = True
        self._engine.close_admission()
        for task in self._tasks:
            task.cancel()
        if self._is_started:
            deadline = time.monotonic() + timeout_s
            is_idle = await asyncio.to_thread(self._engine.wait_idle, timeout_s)
            if not is_idle:
                self._engine.abort_everything(
                    ShuttingDown("The server shut down before this request could finish.")
                )
            # NOTE: never past the grace period (a model still loading or a step that hangs
            # would hold a join for good); the thread is a daemon, and a model process is
            # killed when this process exits.
            left = max(ABORT_GRACE_S, deadline - time.monotonic())
            await asyncio.to_thread(self._engine.stop, left)
        self._tokenizer_pool.shutdown(wait=False, cancel_futures=True)
        self._grammar_pool.shutdown(wait=False, cancel_futures=True)

    # -- state ----------------------------------------------------------------------------
    @property
    def state(self) -> EngineState:
        return self._engine.state

    @property
    def health(self) -> str:
        """ready, loading, restarting, failed, unhealthy (a step hangs) or shutting_down."""
        if self.scheduler.is_closed:
            return "shutting_down"
        if self._engine.is_hung:
            return "unhealthy"
        return self._engine.state.value

    @property
    def load_error(self) -> BaseException | None:
        return self._engine.load_error

    @property
    def last_model_exit(self) -> str | None:
        """Why the model process last went away (`killed by SIGKILL`, `exit code 1`), if ever."""
        return self._engine.last_exit

    def unavailable_error(self) -> ServiceUnavailable | None:
        """While the model restarts, the 503 to answer (with its Retry-After); else None."""
        if self._engine.state is EngineState.RESTARTING:
            return self._engine.restarting_error()
        return None

    @property
    def runner(self) -> Runner:
        """The loaded runner; raises the 503 error that says why there is none yet."""
        if self._engine.state is EngineState.FAILED:
            raise ServiceUnavailable(f"The model is not available: {self._engine.load_error}")
        if self._engine.state is EngineState.RESTARTING:
            raise self._engine.restarting_error()
        if self._engine.runner is None or self._engine.state is not EngineState.READY:
            raise NotReady("The model is still loading. Retry in a few seconds.")
        return self._engine.runner

    @property
    def tokenizer(self) -> Tokenizer:
        return self.runner.tokenizer

    @property
    def model_name(self) -> str:
        return self.runner.model_name

    @property
    def context_window(self) -> int:
        return self.runner.context_window

    @property
    def sampling_defaults(self) -> SamplingParams:
        """What a request's left-out sampling fields take: the model's generation config's
        settings where its tokenizer read them, else SamplingParams' own defaults."""
        return sampling_defaults_of(self.runner.tokenizer)

    @property
    def engine_info(self) -> dict[str, Any]:
        """What the model runner chose: runner, attention kernel, cache, dtype, CUDA graphs."""
        return runner_info(self.runner)

    @property
    def tool_call_format(self) -> ToolCallFormat:
        """How the model writes tool calls: as configured, else as its chat template teaches.

        NOTE: found once per tokenizer: every chat request asks, on the event loop, and finding
        it checks the tokenizer against a runtime Protocol (slow) and reads its template."""
        tokenizer = self.runner.tokenizer
        if self._detected_format is None or self._detected_format[0] is not tokenizer:
            self._detected_format = (tokenizer, format_for(tokenizer, self._tool_call_format))
        return self._detected_format[1]

    @property
    def token_budget(self) -> TokenBudget:
        kv = self.scheduler.kv
        return TokenBudget(
            self.context_window,
            self.max_prompt_tokens,
            self.max_tokens_cap,
            kv_capacity_tokens=None if kv is None else kv.capacity_tokens,
        )

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
        cap_key: str | None = None,
        tools: Sequence[ToolSpec] = (),
    ) -> RequestStream:
        """Admit a chat request; returns its event stream (async iterator), or raises the typed
        error that says why not (QueueFull, ShuttingDown, NotReady, PromptTooLong, a grammar
        that cannot compile, ...). Close the stream (or leave its `async with`) to abort the
        request. `tools` are shown to the model (through its chat template, else in the system
        prompt); `params.grammar` constrains the reply.

        `user` and `priority` order the queue (higher priority
        first, users in turn); `queue_timeout_s` may only lower the server's queue-wait deadline;
        `max_queue_per_user` replaces the server's cap on this user's waiting requests (an API
        key's own); `cap_key`, when given, is whom that cap counts against instead of `user`."""
        arrival = self._clock()
        with self._counting_refusals():
            runner = self._admissible_runner(arrival)  # before paying for tokenization
            grammar = await self._grammar_matcher(runner, params)
            prompt_ids = await self.encode(messages, tools)
            admission = Admission(user, priority, queue_timeout_s, max_queue_per_user, cap_key)
            return self._admit(
                runner, prompt_ids, params, arrival, admission, "chatcmpl", grammar=grammar
            )

    async def submit_prompt(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        user: str = "",
        priority: int = 0,
        queue_timeout_s: float | None = None,
        max_queue_per_user: int | None = None,
        cap_key: str | None = None,
    ) -> RequestStream:
        """Admit a plain-text completion (the legacy completions API): `prompt` is text, encoded
        as it is (no chat template), or token ids. As `submit` otherwise."""
        arrival = self._clock()
        with self._counting_refusals():
            runner = self._admissible_runner(arrival)
            grammar = await self._grammar_matcher(runner, params)
            prompt_ids = await self._prompt_ids(runner.tokenizer, prompt)
            admission = Admission(user, priority, queue_timeout_s, max_queue_per_user, cap_key)
            return self._admit(
                runner, prompt_ids, params, arrival, admission, "cmpl", grammar=grammar
            )

    async def _grammar_matcher(
        self, runner: Runner, params: SamplingParams | None
    ) -> GrammarMatcher | None:
        """A fresh matcher for the request's grammar, compiled (or found in the cache) off the
        event loop; raises GrammarError (a 400) if it cannot be compiled."""
        if params is None or params.grammar is None:
            return None
        if self._grammars is None or self._grammars.tokenizer is not runner.tokenizer:
            self._grammars = GrammarCompiler(runner.tokenizer)
        compiler, spec = self._grammars, params.grammar
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._grammar_pool, compiler.matcher, spec)

    async def _prompt_ids(self, tokenizer: Tokenizer, prompt: str | Sequence[int]) -> list[int]:
        if not isinstance(tokenizer, TextTokenizer):
            raise InvalidRequest(
                "This model's tokenizer cannot encode a plain prompt.", param="prompt"
            )
        if isinstance(prompt, str):
            loop = asyncio.get_running_loop()
            prompt_ids = await loop.run_in_executor(self._tokenizer_pool, tokenizer.encode, prompt)
        else:
            prompt_ids = list(prompt)
            vocab = tokenizer.vocab_size
            if any(not 0 <= i < vocab for i in prompt_ids):
                raise InvalidRequest(
                    f"The prompt holds a token id outside this model's vocabulary (0..{vocab - 1}).",
                    param="prompt",
                )
        if not prompt_ids:
            raise InvalidRequest("The prompt is empty.", param="prompt")
        return prompt_ids

    @contextlib.contextmanager
    def _counting_refusals(self) -> Iterator[None]:
        try:
            yield
        except QueueFull as exc:
            self.metrics.rejected.labels(exc.kind).inc()
            raise

    def _admit(
        self,
        runner: Runner,
        prompt_ids: list[int],
        params: SamplingParams | None,
        arrival: float,
        admission: Admission,
        id_kind: str,
        *,
        grammar: GrammarMatcher | None = None,
    ) -> RequestStream:
        params = params or SamplingParams()
        budget = self.token_budget
        budget.check_prompt(len(prompt_ids))
        max_new = budget.max_new_tokens(len(prompt_ids), params.max_tokens)
        rid = next(self._rids)
        stream = RequestStream(
            f"{id_kind}-{self._id_prefix}{rid:012x}",
            on_abandon=lambda: self._engine.abort(seq),
            max_unread_tokens=self.max_unread_tokens,
        )
        a = admission
        timeouts = [t for t in (self.queue_timeout_s, a.queue_timeout_s) if t is not None]
        seq = EngineSequence(
            rid=rid,
            arrival=arrival,
            user=a.user,
            priority=a.priority,
            deadline=arrival + min(timeouts) if timeouts else None,
            max_queue_per_user=a.max_queue_per_user,
            cap_key=a.cap_key,
            prompt_ids=prompt_ids,
            params=params,
            max_new_tokens=max_new,
            tokenizer=runner.tokenizer,
            sink=stream,
            grammar=grammar,
        )
        self._engine.add(seq, self._clock())
        return stream

    async def encode(
        self, messages: Sequence[ChatMessage], tools: Sequence[ToolSpec] = ()
    ) -> list[int]:
        """The prompt token ids for a conversation (and the tools offered), computed on the
        tokenizer thread."""
        encode = prompt_encoder(self.runner.tokenizer, messages, tools, self.tool_call_format)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenizer_pool, encode)

    def check_room(self, num_places: int) -> None:
        """Raise now what admitting a request of `num_places` sequences (its choices) would:
        shutting down, full, or more than the server ever holds (a 400)."""
        with self._counting_refusals():
            self.scheduler.check_room(self._clock(), num_places)

    def _admissible_runner(self, now: float) -> Runner:
        """The runner, or the error admission would raise now (shutting down, hung, loading or
        failed, full: in that order)."""
        if not self.scheduler.is_closed:
            if self._engine.is_hung:
                raise ServiceUnavailable("The model is not responding. Retry later.")
            runner = self.runner
        self.scheduler.check_room(now)
        return runner

    def _finished(self, seq: EngineSequence, finished: Finished) -> None:
        if self._on_finish is not None:
            stream = seq.sink
            assert isinstance(stream, RequestStream)
            self._on_finish(FinishInfo(stream.request_id, seq.user, finished.reason, finished))

    # -- figures --------------------------------------------------------------------------
    async def load_now(self) -> LoadInfo:
        """`load()`, for a caller that may be in another process (/load asks this way)."""
        return self.load()

    def load(self) -> LoadInfo:
        s = self.scheduler
        now = self._clock()
        kv = s.kv
        pool = {}
        if kv is not None:
            hit_rate = kv.hit_rate
            pool = {
                "kv_block_size": kv.block_size,
                "kv_blocks_total": kv.num_blocks,
                "kv_blocks_used": kv.num_used_blocks,
                "kv_blocks_free": kv.num_free_blocks,
                "kv_tokens_live": s.num_live_tokens,
                "prefix_hit_rate": None if hit_rate is None else round(hit_rate, 4),
            }
        elif "prefix_reuse" in runner_info(self._engine.runner):  # its own: llama.cpp's slots
            share = self.metrics.cached_share
            pool = {"prefix_hit_rate": None if share is None else round(share, 4)}
        return LoadInfo(
            processing=s.num_running,
            waiting=s.num_waiting,
            max_concurrent=s.max_concurrent,
            max_queue_size=s.max_queue_size,
            tokens_per_s=round(self.metrics.tokens_per_s, 2),
            mean_queue_wait_s=self.metrics.mean_queue_wait_s,
            drain_rate_per_s=s.drain.rate(now),
            retry_after_s=s.retry_after(now),
            state=self.health,
            prefill=self._engine.prefill,
            **pool,  # type: ignore[arg-type]
        )

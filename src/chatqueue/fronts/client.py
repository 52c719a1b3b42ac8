"""An API server's queue: `api.QueueService` over the core's ChatQueue, through one connection.

Admission is the core's (a submission is admitted or refused there, as in one server); the
request's events come back in the core's frames, a step's worth at a time, into a RequestStream
as from a local queue. /health reads the core's last snapshot (at most `link.SNAPSHOT_EVERY_S`
old); /load and /metrics ask the core. If the core goes away, every
stream ends with an error and the API server stops.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import signal
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from chatqueue.api import LoadInfo, RequestStream
from chatqueue.api.admission import TokenBudget
from chatqueue.api.chat_queue import Admission
from chatqueue.api.front import DescribedQueue
from chatqueue.api.monitor import sample_loop_lag
from chatqueue.api.wire import Admitted, Refused, Submission
from chatqueue.errors import (
    ChatQueueError,
    CoreLost,
    NotReady,
    ServiceUnavailable,
    ShuttingDown,
)
from chatqueue.fronts import link
from chatqueue.metrics import LAG_BUCKETS
from chatqueue.types import (
    ChatMessage,
    Event,
    Finished,
    FinishReason,
    SamplingParams,
    Token,
    ToolSpec,
    Usage,
)

log = logging.getLogger(__name__)


class FrontMetrics:
    """/metrics of an API server: the core's figures, asked for at each scrape, and this server's
    own event loop lag (`chatqueue_api_server_event_loop_lag_seconds`, labelled by server)."""

    def __init__(self, server: str, client: CoreClient) -> None:
        self._client = client
        self.registry = CollectorRegistry()
        self.core_text = ""
        self.loop_lag = Histogram(
            "chatqueue_api_server_event_loop_lag_seconds",
            "How late a timer on this API server's event loop fired (sampled every 100 ms)",
            ["server"],
            buckets=LAG_BUCKETS,
            registry=self.registry,
        ).labels(server)
        self.registry.register(_CoreFamilies(self))

    async def refresh(self) -> None:
        text = await self._client.call(link.MetricsText())
        assert isinstance(text, bytes)
        self.core_text = text.decode()


class _CoreFamilies(Collector):
    def __init__(self, metrics: FrontMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        yield from text_string_to_metric_families(self._metrics.core_text)


class CoreLimiter:
    """`server.ratelimit.Limiter` whose buckets are the core's, shared by every API server."""

    def __init__(self, client: CoreClient) -> None:
        self._client = client

    async def take(self, caller: str, per_minute: float) -> None:
        result = await self._client.call(link.RateCheck(caller, per_minute))
        if isinstance(result, ChatQueueError):
            raise result


class CoreClient(DescribedQueue):
    """`api.QueueService` over the core at `path` (a Unix socket)."""

    def __init__(
        self,
        path: str,
        *,
        name: str,
        max_unread_tokens: int,
        max_prompt_tokens: int | None,
        max_tokens_cap: int | None,
        tool_call_format: str,
    ) -> None:
        super().__init__(
            tool_call_format=tool_call_format,
            max_prompt_tokens=max_prompt_tokens,
            max_tokens_cap=max_tokens_cap,
        )
        self.metrics = FrontMetrics(name, self)
        self._path = path
        self._max_unread_tokens = max_unread_tokens
        self._writer: asyncio.StreamWriter | None = None
        self._calls: dict[int, asyncio.Future[link.Answer]] = {}
        self._ids = itertools.count(1)
        self._keys = itertools.count(1)
        self._streams: dict[str, _Followed] = {}
        self._snapshot: link.Snapshot | None = None
        self._described = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._is_stopping = False
        self._is_lost = False

    # -- life cycle -----------------------------------------------------------------------
    async def start_queue_worker(self) -> None:
        if self._tasks:
            return
        reader, self._writer = await asyncio.open_unix_connection(self._path)
        lag = sample_loop_lag(lambda _, lag_s: self.metrics.loop_lag.observe(lag_s))
        self._tasks = [asyncio.create_task(self._read(reader)), asyncio.create_task(lag)]

    async def wait_ready(self, timeout_s: float | None = None) -> None:
        try:
            await asyncio.wait_for(self._described.wait(), timeout_s)
        except TimeoutError:
            raise NotReady("The model is not ready yet.") from None

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Stop admitting; let this server's streams finish for up to `timeout_s`, then end the
        rest (the core aborts them). A second call returns at once."""
        if self._is_stopping:
            return
        self._is_stopping = True
        waits = [asyncio.ensure_future(f.done.wait()) for f in self._streams.values()]
        if waits:
            await asyncio.wait(waits, timeout=timeout_s)
            for wait in waits:
                wait.cancel()
        cut_short = ShuttingDown("The server shut down before this request could finish.")
        for key in list(self._streams):
            self._end(key, cut_short, FinishReason.ABORT)
            self._send(link.Abandon(key))
        for task in self._tasks:
            task.cancel()
        if self._writer is not None:
            self._writer.close()
        self.close_tokenizer()

    # -- the connection -------------------------------------------------------------------
    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                message = await link.read(reader)
                if isinstance(message, link.Events):
                    for key, events in message.batch():
                        followed = self._streams.get(key)
                        if followed is not None:
                            followed.deliver(events)
                            if followed.done.is_set():
                                del self._streams[key]
                elif isinstance(message, link.Snapshot):
                    self._observe(message)
                elif isinstance(message, link.Reply):
                    future = self._calls.pop(message.id, None)
                    if future is not None and not future.done():
                        future.set_result(message.result)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            self._lost(exc)

    def _observe(self, snapshot: link.Snapshot) -> None:
        self._snapshot = snapshot
        if snapshot.description is not None and self._description is None:
            self._description = snapshot.description
            self._described.set()

    def _lost(self, exc: BaseException) -> None:
        """The core is gone (it stopped, or died): end every stream, refuse what comes, stop."""
        if self._is_stopping:
            return
        log.error("the core process went away (%s): stopping this API server", exc)
        self._is_lost = True
        error = CoreLost()
        for key in list(self._streams):
            self._end(key, error, FinishReason.ERROR)
        for future in self._calls.values():
            if not future.done():
                future.set_exception(error)
        self._calls.clear()
        os.kill(os.getpid(), signal.SIGTERM)  # the server drains (nothing left) and exits

    def _send(self, message: object) -> None:
        if self._writer is not None and not self._writer.is_closing():
            link.write(self._writer, message)

    async def call(self, what: link.Question) -> link.Answer:
        if self._is_lost:
            raise CoreLost()
        call_id = next(self._ids)
        future: asyncio.Future[link.Answer] = asyncio.get_running_loop().create_future()
        self._calls[call_id] = future
        self._send(link.Call(call_id, what))
        try:
            return await future
        finally:
            self._calls.pop(call_id, None)

    # -- state ----------------------------------------------------------------------------
    @property
    def health(self) -> str:
        if self._is_stopping or self._is_lost:
            return "shutting_down"
        return "loading" if self._snapshot is None else self._snapshot.health

    @property
    def load_error(self) -> BaseException | None:
        text = None if self._snapshot is None else self._snapshot.load_error
        return None if text is None else ServiceUnavailable(text)

    @property
    def last_model_exit(self) -> str | None:
        return None if self._snapshot is None else self._snapshot.last_model_exit

    def unavailable_error(self) -> ServiceUnavailable | None:
        return None if self._snapshot is None else self._snapshot.unavailable

    @property
    def is_closed(self) -> bool:
        return self._is_stopping or self._is_lost

    @property
    def engine_info(self) -> dict[str, Any]:
        return {} if self._snapshot is None else self._snapshot.engine_info

    @property
    def token_budget(self) -> TokenBudget:
        """The core's (with its KV pool's bound, where it has one), once it has sent it."""
        budget = None if self._snapshot is None else self._snapshot.token_budget
        return super().token_budget if budget is None else budget

    def load(self) -> LoadInfo:
        """As of the core's last snapshot (`load_now` asks it)."""
        if self._snapshot is None:
            return LoadInfo(0, 0, 0, 0, 0.0, None, None, 1, self.health)
        return self._snapshot.load

    async def load_now(self) -> LoadInfo:
        if self._is_lost or self._writer is None:
            return self.load()
        load = await self.call(link.LoadNow())
        assert isinstance(load, LoadInfo)
        return load

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
        admission = Admission(user, priority, queue_timeout_s, max_queue_per_user, cap_key)
        return await self._place(Submission.of_chat(messages, params, tools, admission))

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
        admission = Admission(user, priority, queue_timeout_s, max_queue_per_user, cap_key)
        return await self._place(Submission.of_prompt(prompt, params, admission))

    async def _place(self, submission: Submission) -> RequestStream:
        self.description  # noqa: B018 - raises while loading or stopping
        key = f"{next(self._keys):x}"
        stream = RequestStream(
            "", on_abandon=lambda: self._abandon(key), max_unread_tokens=self._max_unread_tokens
        )
        followed = self._streams[key] = _Followed(stream)
        try:
            result = await self.call(dataclasses.replace(submission, key=key))
        except BaseException:  # cancelled (the client went away) or the core is gone
            if self._streams.pop(key, None) is not None:
                self._send(link.Abandon(key))
            raise
        if isinstance(result, Refused):
            self._streams.pop(key, None)
            raise result.error
        assert isinstance(result, Admitted)
        stream.request_id = result.request_id
        if followed.done.is_set():  # it ended before its admission's reply was read
            self._streams.pop(key, None)
        return stream

    def _abandon(self, key: str) -> None:
        """The client went away (or fell too far behind): the core aborts the request."""
        if self._streams.pop(key, None) is not None:
            self._send(link.Abandon(key))

    def _end(self, key: str, error: ChatQueueError, reason: FinishReason) -> None:
        followed = self._streams.pop(key, None)
        if followed is not None:
            followed.end(error, reason)


class _Followed:
    """A request this API server placed, as its events come."""

    def __init__(self, stream: RequestStream) -> None:
        self.stream = stream
        self.done = asyncio.Event()
        self._parts: list[str] = []
        self._num_tokens = 0

    def deliver(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, Finished):
                self.done.set()
            elif isinstance(event, Token):
                self._parts.append(event.text)
                self._num_tokens += event.num_tokens
            self.stream.push(event)

    def end(self, error: ChatQueueError, reason: FinishReason) -> None:
        """Ended here (the core went away, or this server stops), with what came so far."""
        if not self.done.is_set():
            self.done.set()
            usage = Usage(0, self._num_tokens)
            self.stream.push(Finished(reason, usage, text="".join(self._parts), error=error))

"""The front's queue: what the HTTP routes call (`api.QueueService`), over many replicas.

The requests that arrive together are placed as one wave (`placer`): one call a replica a round,
free slots first, then queue places, in the order `policy` ranks the replicas for each request.
A replica takes what it has room for and refuses the rest, and the rest go to the next replica
before any client hears anything: a client gets 429 only when every healthy replica has refused
it as full. An admitted request's events come back from its replica into a RequestStream, as from
a local queue, in batches on the front's channel to it (`channels`); if the replica dies, the
stream ends with a `replica_lost` error.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from ray.serve.handle import DeploymentHandle

from chatqueue.api import LoadInfo, RequestStream
from chatqueue.api.chat_queue import Admission
from chatqueue.api.front import DescribedQueue
from chatqueue.api.wire import Refused, Submission
from chatqueue.cluster import view
from chatqueue.cluster.channels import Channels, Placed
from chatqueue.cluster.ledger import Ledger
from chatqueue.cluster.link import Lines
from chatqueue.cluster.placer import NoReplica, Placer, Unplaced, may_try_next
from chatqueue.cluster.policy import conversation_key
from chatqueue.cluster.stats import ReplicaStats
from chatqueue.config import Settings
from chatqueue.errors import (
    ChatQueueError,
    NotReady,
    QueueFull,
    ReplicaLost,
    ServiceUnavailable,
    ShuttingDown,
    UserQueueFull,
)
from chatqueue.metrics import Metrics
from chatqueue.types import (
    ChatMessage,
    Event,
    Finished,
    SamplingParams,
    Started,
    Token,
    ToolSpec,
)

log = logging.getLogger(__name__)

DESCRIBE_EVERY_S = 0.5
REFRESH_EVERY_S = 0.5
MAX_CONVERSATIONS = 100_000  # remembered for stickiness, least recently used forgotten
STATE_ORDER = ("ready", "loading", "restarting", "unhealthy", "shutting_down", "failed")


@dataclass(frozen=True, slots=True)
class ClusterLoad(LoadInfo):
    """/load of a cluster: the totals (LoadInfo's fields) and a row per replica."""

    replicas: tuple[dict[str, Any], ...] = ()


class ClusterQueue(DescribedQueue):
    """`api.QueueService` over the replicas behind `handle`."""

    holder = "a replica"

    def __init__(
        self,
        handle: DeploymentHandle[Any],
        settings: Settings,
        app_name: str,
        link_secret: bytes | None = None,
    ) -> None:
        """`link_secret`: the cluster's, for the front's own lines to the replicas (`link`);
        None: every placement is a Serve call."""
        super().__init__(
            tool_call_format=settings.tool_call_format,
            max_prompt_tokens=settings.max_prompt_tokens,
            max_tokens_cap=settings.max_tokens_cap,
        )
        self.metrics = Metrics()
        self._asked_again = Counter(
            "chatqueue_cluster_asked_again",
            "Requests that another replica took after one refused them (its figures were old)",
            registry=self.metrics.registry,
        )
        self._wave_sizes = Histogram(
            "chatqueue_cluster_wave_requests",
            "Requests a wave carried to a replica (one a replica a round of a wave), by how it "
            "went: the front's line to the replica or a Serve call",
            ["by"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=self.metrics.registry,
        )
        self.metrics.registry.register(_ReplicaCollector(self._replicas))
        self._handle = handle
        self._settings = settings
        self._app_name = app_name
        self._described = asyncio.Event()
        self._conversations: OrderedDict[str, str] = OrderedDict()  # key -> replica
        self._ledger = Ledger()
        self._lines = Lines(link_secret) if link_secret is not None else None
        self._channels = Channels(
            handle,
            max_unread_tokens=settings.max_unread_tokens,
            on_event=self._observe,
            is_listed=lambda replica: any(r == replica for r, _ in self._replicas()),
            on_lost=lambda replica: self._placer.lost(replica),
        )
        self._placer = Placer(
            handle,
            front=self._channels.front,
            ledger=self._ledger,
            replicas=self._replicas,
            on_orphan=self._channels.abort,
            on_taken_elsewhere=self._asked_again.inc,
            on_call=lambda n, by: self._wave_sizes.labels(by).observe(n),
            lines=self._lines,
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._is_stopping = False
        self._rng = random.Random()

    # -- life cycle -----------------------------------------------------------------------
    async def start_queue_worker(self) -> None:
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._describe()),
                asyncio.create_task(self._refresh_gauges()),
            ]

    async def _describe(self) -> None:
        """Ask a replica for the model's description until one is ready to give it."""
        while self._description is None:
            try:
                self._description = await self._handle.describe.remote()
                self._described.set()
            except Exception as exc:  # loading, or no replica yet
                log.debug("no model description yet: %s", exc)
                await asyncio.sleep(DESCRIBE_EVERY_S)

    async def _refresh_gauges(self) -> None:
        while True:
            rows = [s for _, s in self._replicas() if s is not None]
            self.metrics.running.set(sum(s.running for s in rows))
            self.metrics.waiting.set(sum(s.waiting for s in rows))
            await asyncio.sleep(REFRESH_EVERY_S)

    async def wait_ready(self, timeout_s: float | None = None) -> None:
        try:
            await asyncio.wait_for(self._described.wait(), timeout_s)
        except TimeoutError:
            raise NotReady("No replica is ready yet.") from None

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Stop admitting; let the streams in flight finish for up to `timeout_s`, then end the
        rest (their replicas abort them)."""
        self._is_stopping = True
        for task in self._tasks:
            task.cancel()
        cut_short = ShuttingDown("The server shut down before this request could finish.")
        await self._channels.drain(timeout_s, cut_short)
        if self._lines is not None:
            self._lines.close()
        self.close_tokenizer()

    # -- state ----------------------------------------------------------------------------
    def _replicas(self) -> list[tuple[str, ReplicaStats | None]]:
        """The replicas the router routes to, each with the freshest figures the front has:
        the router's, or the replica's answer to this front's last wave there."""
        return self._ledger.freshest(view.replicas_of(self._app_name))

    @property
    def health(self) -> str:
        """ready while any replica is ready (and the model described); else the best state
        a replica is in: loading, restarting, unhealthy, shutting_down, failed."""
        if self._is_stopping:
            return "shutting_down"
        if self._description is None:
            return "loading"
        states = {s.state for _, s in self._replicas() if s is not None}
        if not states or "ready" in states:
            return "ready"
        return min(states, key=lambda s: STATE_ORDER.index(s) if s in STATE_ORDER else 99)

    @property
    def load_error(self) -> BaseException | None:
        if self.health == "failed":
            return ServiceUnavailable("Every replica's model has failed.")
        return None

    @property
    def last_model_exit(self) -> str | None:
        return None

    def unavailable_error(self) -> ServiceUnavailable | None:
        return None

    @property
    def is_closed(self) -> bool:
        return self._is_stopping

    @property
    def engine_info(self) -> dict[str, Any]:
        """The replicas report their choices in their own logs; the front knows none of them."""
        return {}

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
        submission = Submission.of_chat(messages, params, tools, admission)
        # NOTE: a conversation's later turns prefer the replica of its last turn (its prefix is
        # warm there); a first turn has none to prefer.
        is_later_turn = any(m.role == "assistant" for m in messages)
        return await self._place(submission, conversation_key(messages), sticky=is_later_turn)

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
        return await self._place(
            Submission.of_prompt(prompt, params, admission), None, sticky=False
        )

    async def _place(
        self, submission: Submission, key: str | None, *, sticky: bool
    ) -> RequestStream:
        """Place it with the requests that arrive with it; raises the refusal that stands when
        no replica takes it. `key` names the conversation, whose replica is remembered and,
        when `sticky`, preferred."""
        self.description  # noqa: B018 - raises while loading or stopping
        waits_as = self._check_user_cap(submission)
        prefer = self._conversations.get(key) if key is not None and sticky else None
        placed = self._channels.new(time.monotonic())
        submission = dataclasses.replace(submission, front=self._channels.front, key=placed.key)
        try:
            admitted = await self._placer.place(submission, prefer)
        except Unplaced as unplaced:
            self._channels.refused(placed)
            raise self._refusal(unplaced.refusals) from None
        except NoReplica:
            self._channels.refused(placed)
            raise ReplicaLost("No replica answered. Retry shortly.") from None
        except BaseException:
            self._channels.refused(placed)
            raise
        if key is not None:
            self._remember(key, admitted.replica)
        self._channels.admitted(placed, admitted.replica, admitted.request_id, waits_as)
        return placed.stream

    def _check_user_cap(self, s: Submission) -> str | None:
        """The per-user waiting cap, counted across the replicas: the front sees every request
        placed and hears when each starts. Returns the key the request counts against."""
        cap = s.max_queue_per_user or self._settings.max_queue_per_user
        counted_as = s.user if s.cap_key is None else s.cap_key
        if cap is None or not counted_as:
            return None
        if self._channels.waiting_for(counted_as) >= cap:
            self.metrics.rejected.labels(UserQueueFull.kind).inc()
            raise UserQueueFull(
                f"You already have {cap} requests waiting, the most one user may queue. "
                "Retry when one has started.",
                retry_after_s=self.load().retry_after_s,
            )
        return counted_as

    def _refusal(self, refusals: list[Refused]) -> ChatQueueError:
        """Every replica asked has refused (or the last one refused for good): a 429 if any was
        full, with a Retry-After from all their drain rates together; else the last reason."""
        err = refusals[-1].error
        full = [r for r in refusals if isinstance(r.error, QueueFull)]
        if not may_try_next(err) or not full:
            if isinstance(err, QueueFull):
                self.metrics.rejected.labels(err.kind).inc()
            return err
        self.metrics.rejected.labels(QueueFull.kind).inc()
        return QueueFull(
            f"Every replica is at capacity ({len(full)} asked). Retry later.",
            retry_after_s=self._retry_after(full),
        )

    def _retry_after(self, full: list[Refused]) -> int:
        """As one server's (scheduler.retry_after_spread), with the replicas' summed drain
        rate and waiting requests: a time drawn between one completion anywhere and the drain
        of everything waiting."""
        rate = sum(r.drain_rate_per_s or 0.0 for r in full)
        if rate <= 0:
            return 1
        drained = (sum(r.waiting for r in full) + 1) / rate
        return max(1, math.ceil(self._rng.uniform(1.0 / rate, max(1.0 / rate, drained))))

    def _remember(self, key: str, replica: str) -> None:
        self._conversations[key] = replica
        self._conversations.move_to_end(key)
        if len(self._conversations) > MAX_CONVERSATIONS:
            self._conversations.popitem(last=False)

    def _observe(self, placed: Placed, event: Event) -> None:
        m = self.metrics
        if isinstance(event, Started):
            m.observe_queue_wait(event.queue_wait_s)
        elif isinstance(event, Token):
            if placed.num_tokens == 0:
                m.ttft.observe(time.monotonic() - placed.started)
            m.observe_tokens(event.num_tokens)
        elif isinstance(event, Finished):
            if placed.replica:
                self._ledger.ended(placed.replica)
            m.finished.labels(event.reason.value).inc()
            m.prompt_tokens.inc(event.usage.prompt_tokens)
            m.generated_tokens.inc(event.usage.completion_tokens)

    # -- figures --------------------------------------------------------------------------
    async def load_now(self) -> ClusterLoad:
        return self.load()  # NOTE: the replicas' figures are as fresh as the front knows them

    def load(self) -> ClusterLoad:
        now = time.time()
        rows: list[dict[str, Any]] = []
        stats = []
        for replica, s in self._replicas():
            if s is None:
                rows.append({"replica": replica, "state": "unknown"})
                continue
            stats.append(s)
            rows.append({**s.as_dict(), "age_s": round(max(0.0, now - s.sampled_at), 3)})
        rates = [s.drain_rate_per_s for s in stats if s.drain_rate_per_s]
        rate = sum(rates) if rates else None
        return ClusterLoad(
            processing=sum(s.running for s in stats),
            waiting=sum(s.waiting for s in stats),
            max_concurrent=sum(s.max_concurrent for s in stats),
            max_queue_size=sum(s.max_queue_size for s in stats),
            tokens_per_s=round(sum(s.tokens_per_s for s in stats), 2),
            mean_queue_wait_s=self.metrics.mean_queue_wait_s,
            drain_rate_per_s=rate,
            retry_after_s=max(1, math.ceil(1.0 / rate)) if rate else 1,
            state=self.health,
            replicas=tuple(sorted(rows, key=lambda r: str(r["replica"]))),
        )


class _ReplicaCollector(Collector):
    """/metrics: each replica's figures as the router last saw them, labelled by replica."""

    def __init__(self, replicas: Callable[[], list[tuple[str, ReplicaStats | None]]]) -> None:
        self._replicas = replicas

    def collect(self) -> Iterator[Metric]:
        running = GaugeMetricFamily(
            "chatqueue_replica_running_requests", "Generating now, by replica", labels=["replica"]
        )
        waiting = GaugeMetricFamily(
            "chatqueue_replica_waiting_requests", "In the queue, by replica", labels=["replica"]
        )
        ready = GaugeMetricFamily(
            "chatqueue_replica_ready", "1 while the replica serves, by replica", labels=["replica"]
        )
        for replica, stats in self._replicas():
            if stats is not None:
                running.add_metric([replica], stats.running)
                waiting.add_metric([replica], stats.waiting)
            ready.add_metric([replica], 1.0 if stats is not None and stats.is_ready else 0.0)
        yield from (running, waiting, ready)

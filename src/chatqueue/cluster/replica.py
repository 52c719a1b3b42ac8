"""One replica of a cluster: one ChatQueue over one model, as a Ray Serve deployment class.

A front places the requests that arrived together with one call a replica (`place`, a `Wave`),
on its own line to the replica (`link`) or by a Serve call: the replica admits or refuses each
at once (a request it has already taken is answered the same), and with `slots_only` takes no
more than it has free slots, leaving the rest for the next replica. The requests' events go to
the front in batches on the front's channel (`events`, one open call per front and replica, see
`outbox`); the front's `abort` call ends requests whose clients went away, and a channel the
front cancels (it stopped, or it is gone) ends that front's requests here, and so does a front's
silence: a front renews its lease (`renew`) where it has requests, and one not heard from for a
lease (`leases`: it was killed outright, which cancels nothing) has its requests aborted. It
publishes its figures for the router and the front (`record_routing_stats`), its running and
waiting requests for autoscaling (`record_autoscaling_stats`, see `scaling`), and fails Serve's
health check when its model has failed for good, so that Serve replaces it."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import AsyncIterator

from ray import serve

from chatqueue.api import ChatQueue, RequestStream
from chatqueue.api.build import chat_queue_for
from chatqueue.api.outbox import Outbox, encode
from chatqueue.api.wire import Admitted, Description, Refused, Submission
from chatqueue.cluster.leases import Leases
from chatqueue.cluster.link import LinkServer, Remembered
from chatqueue.cluster.policy import RouteHint
from chatqueue.cluster.scaling import RUNNING, WAITING
from chatqueue.cluster.stats import ReplicaStats
from chatqueue.cluster.wave import Wave, WaveAnswer
from chatqueue.config import Settings
from chatqueue.errors import ChatQueueError, NotReady

log = logging.getLogger(__name__)

SWITCH_INTERVAL_S = 0.0005
WATCH_EVERY_S = 1.0  # how often the fronts' leases are looked at


class ChatQueueReplica:
    # NOTE: Serve awaits an async constructor; the queue's worker needs the replica's loop.
    async def __init__(  # type: ignore[misc]
        self, settings: Settings, link_secret: bytes | None = None
    ) -> None:
        # NOTE: as in one server (server/serve.py): the engine thread waits for the GIL behind
        # this process's event loops (Serve runs two, and Ray's own threads) up to the switch
        # interval each time, 5 ms by default, several times a step.
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self._settings = settings
        self._cq: ChatQueue = chat_queue_for(settings)
        self._id = serve.get_replica_context().replica_id.unique_id
        self._node = _node_id()
        self._num_admitted = 0
        self._outboxes: dict[str, Outbox] = {}  # by front
        self._channels: dict[str, object] = {}  # by front: the channel now open
        self._requests: dict[tuple[str, str], asyncio.Task[None]] = {}  # (front, key)
        self._leases = Leases()
        self._taken: Remembered[asyncio.Future[Admitted | Refused]] = Remembered()
        await self._cq.start_queue_worker()
        self._watch = asyncio.create_task(self._watch_fronts())
        self._link: LinkServer | None = None
        self._link_address = ""
        host = _node_address()
        if link_secret is not None and host:
            self._link = LinkServer(
                link_secret, lambda wave, replica: self.place(wave, RouteHint(only=replica))
            )
            self._link_address = await self._link.start(host)

    async def place(self, wave: Wave, route: object = None) -> WaveAnswer:
        """Admit or refuse each of the wave's requests, in order. `route` (RouteHint.only)
        named the replica the front meant: another one (that one is gone) takes nothing."""
        if getattr(route, "only", self._id) != self._id:
            return WaveAnswer(self._id, (), None)
        self._leases.heard(wave.front, time.monotonic())
        outbox = self._outboxes.setdefault(wave.front, Outbox())
        load = self._cq.load()
        room = load.max_concurrent - load.processing - load.waiting if wave.slots_only else None
        outcomes: list[Admitted | Refused | None] = []
        for submission in wave.submissions:
            earlier = self._taken.get(wave.front, submission.key)
            if earlier is not None:  # sent again (its line broke): the same answer
                outcomes.append(await asyncio.shield(earlier))
                continue
            if room is not None and room <= 0:
                outcomes.append(None)
                continue
            outcome = await self._take(wave.front, submission, outbox)
            if room is not None and isinstance(outcome, Admitted):
                room -= 1
            outcomes.append(outcome)
        return WaveAnswer(self._id, tuple(outcomes), self.stats())

    async def _take(self, front: str, submission: Submission, outbox: Outbox) -> Admitted | Refused:
        """Admit it, remembered from the start: the same request sent again meanwhile (by
        another path) waits for this answer rather than being admitted again."""
        taking: asyncio.Future[Admitted | Refused] = asyncio.get_running_loop().create_future()
        self._taken.put(front, submission.key, taking)
        try:
            outcome = await self._admit(submission, outbox)
        except BaseException:
            self._taken.forget(front, submission.key)
            taking.cancel()
            raise
        taking.set_result(outcome)
        return outcome

    async def _admit(self, submission: Submission, outbox: Outbox) -> Admitted | Refused:
        try:
            stream = await submission.submit_to(self._cq)
        except ChatQueueError as exc:
            load = self._cq.load()
            return Refused(self._id, exc, load.waiting, load.drain_rate_per_s)
        self._num_admitted += 1
        outbox.add(submission.key, stream)
        request = (submission.front, submission.key)
        self._requests[request] = asyncio.create_task(self._follow(request, stream, outbox))
        return Admitted(self._id, stream.request_id)

    async def _follow(
        self, request: tuple[str, str], stream: RequestStream, outbox: Outbox
    ) -> None:
        """Until the request's end is on the channel; cancelled (`abort`), it aborts."""
        try:
            async with stream:
                await outbox.until_sent(request[1])
        finally:
            self._requests.pop(request, None)

    async def abort(self, front: str, keys: list[str], route: object = None) -> None:
        """The front's clients of these requests went away."""
        self._leases.heard(front, time.monotonic())
        for key in keys:
            task = self._requests.get((front, key))
            if task is not None:
                task.cancel()

    async def renew(self, front: str, route: object = None) -> None:
        """The front is there (its lease on this replica's requests of its own)."""
        self._leases.heard(front, time.monotonic())

    async def _watch_fronts(self) -> None:
        """Abort the requests of every front silent for longer than a lease."""
        while True:
            await asyncio.sleep(WATCH_EVERY_S)
            fronts = {front for front, _ in self._requests}
            for front in self._leases.expired(fronts, time.monotonic()):
                count = sum(1 for f, _ in self._requests if f == front)
                log.warning(
                    "front %s not heard from for a lease: aborting its %s requests", front, count
                )
                self._abort_all(front)
            self._leases.forget_all_but(fronts)

    async def events(self, front: str, route: object = None) -> AsyncIterator[bytes]:
        """The front's channel: its requests' events in batches (`outbox.decode`), until none
        of its requests here is left. `route` (RouteHint.only) named the replica the front
        meant: another one (that replica is gone) ends the channel at once. A channel cancelled
        while it is the front's open one (the front stopped or is gone) aborts its requests."""
        outbox = self._outboxes.get(front)
        if outbox is None or getattr(route, "only", self._id) != self._id:
            return
        self._leases.heard(front, time.monotonic())
        token = object()
        self._channels[front] = token
        ended = False
        try:
            async for batch in outbox.batches():
                yield encode(batch)
            ended = True
        finally:
            if self._channels.get(front) is token:
                del self._channels[front]
                if not ended:
                    self._abort_all(front)
            if not outbox and self._outboxes.get(front) is outbox:
                del self._outboxes[front]

    def _abort_all(self, front: str) -> None:
        for (of, _), task in list(self._requests.items()):
            if of == front:
                task.cancel()

    async def describe(self) -> Description:
        """Raises NotReady while the model loads (the front asks again)."""
        if self._cq.health != "ready":
            raise NotReady(f"The replica is {self._cq.health}.")
        cq = self._cq
        return Description(
            model_name=cq.model_name,
            context_window=cq.context_window,
            tokenizer=cq.tokenizer,
            max_concurrent=self._settings.max_concurrent,
            max_queue_size=self._settings.max_queue_size,
        )

    def stats(self) -> ReplicaStats:
        load = self._cq.load()
        return ReplicaStats(
            replica=self._id,
            state=load.state,
            running=load.processing,
            waiting=load.waiting,
            max_concurrent=load.max_concurrent,
            max_queue_size=load.max_queue_size,
            drain_rate_per_s=load.drain_rate_per_s,
            tokens_per_s=load.tokens_per_s,
            admitted=self._num_admitted,
            sampled_at=time.time(),
            node=self._node,
            pid=os.getpid(),
            link=self._link_address,
        )

    def record_routing_stats(self) -> dict[str, object]:
        """Serve calls this every stats period; the router reads it (`ReplicaStats`)."""
        return self.stats().as_dict()

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve calls this while autoscaling; `scaling.replicas_for_queue_depth` reads it."""
        load = self._cq.load()
        return {RUNNING: float(load.processing), WAITING: float(load.waiting)}

    def check_health(self) -> None:
        """Serve's health check: a model that failed for good (its load, or too many restarts)
        makes Serve replace the replica; loading and restarting are not failures."""
        if self._cq.health == "failed":
            raise RuntimeError(f"the model failed: {self._cq.load_error}")

    async def __del__(self) -> None:
        # NOTE: Serve calls this once the replica's requests have finished or its graceful
        # shutdown timeout has passed; what is left is aborted.
        self._watch.cancel()
        if self._link is not None:
            await self._link.close()
        await self._cq.stop(0)


def _node_address() -> str:
    """This node's address for a front's line to listen on; "" outside a Ray worker."""
    import ray

    if not ray.is_initialized():
        return ""
    return str(ray.util.get_node_ip_address())


def _node_id() -> str:
    import ray

    try:
        return str(ray.get_runtime_context().get_node_id())
    except Exception:  # not in a Ray worker (a unit test)
        return ""

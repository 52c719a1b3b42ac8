"""One replica of a cluster: one ChatQueue over one model, as a Ray Serve deployment class.

The front submits through Serve's handle (routed by `router.ChatQueueRouter`); the replica admits
or refuses at once (`Refused`: the front tries the next one). The request's events go to the
front in batches on the front's channel (`events`, one open call per front and replica, see
`outbox`), while the submitting call stays open until the request's end has been sent: Serve
counts it as one ongoing request (autoscaling, a graceful drain), the front hears at once if this
replica dies, and the front cancelling it (its client went away) aborts the request. It publishes its figures for the router (`record_routing_stats`) and fails Serve's health check
when its model has failed for good, so that Serve replaces it."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import AsyncIterator

from ray import serve

from chatqueue.api import ChatQueue
from chatqueue.api.build import chat_queue_for
from chatqueue.api.outbox import Outbox, encode
from chatqueue.api.wire import Admitted, Description, Refused, Submission
from chatqueue.cluster.stats import ReplicaStats
from chatqueue.config import Settings
from chatqueue.errors import ChatQueueError, NotReady

SWITCH_INTERVAL_S = 0.0005


class ChatQueueReplica:
    # NOTE: Serve awaits an async constructor; the queue's worker needs the replica's loop.
    async def __init__(self, settings: Settings) -> None:  # type: ignore[misc]
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
        await self._cq.start_queue_worker()

    async def submit(
        self, submission: Submission, route: object = None
    ) -> AsyncIterator[Admitted | Refused]:
        """`route` is the router's (a RouteHint); the replica has no use for it."""
        try:
            stream = await submission.submit_to(self._cq)
        except ChatQueueError as exc:
            load = self._cq.load()
            yield Refused(self._id, exc, load.waiting, load.drain_rate_per_s)
            return
        self._num_admitted += 1
        outbox = self._outboxes.setdefault(submission.front, Outbox())
        outbox.add(submission.key, stream)
        yield Admitted(self._id, stream.request_id)
        async with stream:  # leaving early (the front cancelled: client gone) aborts it
            await outbox.until_sent(submission.key)

    async def events(self, front: str, route: object = None) -> AsyncIterator[bytes]:
        """The front's channel: its requests' events in batches (`outbox.decode`), until none
        of its requests here is left. `route` (RouteHint.only) named the replica the front
        meant: another one (that replica is gone) ends the channel at once."""
        outbox = self._outboxes.get(front)
        if outbox is None or getattr(route, "only", self._id) != self._id:
            return
        try:
            async for batch in outbox.batches():
                yield encode(batch)
        finally:
            if not outbox and self._outboxes.get(front) is outbox:
                del self._outboxes[front]

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

    def record_routing_stats(self) -> dict[str, object]:
        """Serve calls this every stats period; the router reads it (`ReplicaStats`)."""
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
        ).as_dict()

    def check_health(self) -> None:
        """Serve's health check: a model that failed for good (its load, or too many restarts)
        makes Serve replace the replica; loading and restarting are not failures."""
        if self._cq.health == "failed":
            raise RuntimeError(f"the model failed: {self._cq.load_error}")

    async def __del__(self) -> None:
        # NOTE: Serve calls this once the replica's requests have finished or its graceful
        # shutdown timeout has passed; what is left is aborted.
        await self._cq.stop(0)


def _node_id() -> str:
    import ray

    try:
        return str(ray.get_runtime_context().get_node_id())
    except Exception:  # not in a Ray worker (a unit test)
        return ""

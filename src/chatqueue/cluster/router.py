"""The cluster's request router, on Ray Serve's request-router API: ranks the replicas for each
request by the rules in `policy` from the figures the replicas publish, corrected by what this
router has sent them since. Serve then sends the request to the first one that takes it.

It also shares what it sees (`view`): the front's /load, /health and /metrics read the same
replica figures the router ranks by."""

from __future__ import annotations

import itertools
import time
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from chatqueue.cluster import view
from chatqueue.cluster.policy import Candidate, RouteHint, rank
from chatqueue.cluster.stats import ReplicaStats

# NOTE: entries of requests that were chosen but never reached a replica (a cancelled routing)
# would otherwise stay; any older than this no longer count against a replica anyway, since
# its stats are refreshed every STATS_PERIOD_S.
FORGET_AFTER_S = 60.0


class ChatQueueRouter(RequestRouter):
    def initialize_state(self, **kwargs: Any) -> None:
        self._sent: dict[str, tuple[str, float]] = {}  # request -> (replica, when chosen)
        self._order = itertools.count(1)
        self._last_chosen: dict[str, int] = {}
        view.publish(self.app_name, self)

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        candidates = [self._candidate(rid, r) for rid, r in by_id.items()]
        hint = hint_of(pending_request)
        order = rank(candidates, hint)
        if order and pending_request is not None and hint.only is None:
            self._note_sent(pending_request.metadata.internal_request_id, order[0])
        # NOTE: one replica a rank, so Serve asks them in exactly this order.
        return [[by_id[rid]] for rid in order]

    def _candidate(self, rid: str, replica: RunningReplica) -> Candidate:
        stats = ReplicaStats.from_dict(replica.routing_stats)
        in_flight = 0
        if stats is not None:
            in_flight = sum(
                1 for r, at in self._sent.values() if r == rid and at > stats.sampled_at
            )
        return Candidate(rid, stats, in_flight, self._last_chosen.get(rid, 0))

    def _note_sent(self, request: str, replica: str) -> None:
        now = time.time()
        self._sent[request] = (replica, now)
        self._last_chosen[replica] = next(self._order)
        if len(self._sent) % 256 == 0:
            old = [k for k, (_, at) in self._sent.items() if at < now - FORGET_AFTER_S]
            for k in old:
                del self._sent[k]

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any
    ) -> None:
        """Serve sent it to `replica_id`: normally the first of our ranking, but not always
        (that one's Serve queue was full)."""
        if hint_of(pending_request).only is not None:
            return  # a front's channel, not a request
        request = pending_request.metadata.internal_request_id
        chosen = self._sent.get(request)
        at = chosen[1] if chosen is not None else time.time()
        self._sent[request] = (replica_id.unique_id, at)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self._sent.pop(internal_request_id, None)

    def replica_stats(self) -> list[tuple[str, ReplicaStats | None]]:
        """Every replica Serve routes to now, with its last figures (None: none yet)."""
        replicas = list(self.curr_replicas.values())
        return [(r.replica_id.unique_id, ReplicaStats.from_dict(r.routing_stats)) for r in replicas]


def hint_of(pending_request: PendingRequest | None) -> RouteHint:
    route = pending_request.kwargs.get("route") if pending_request is not None else None
    return route if isinstance(route, RouteHint) else RouteHint()

"""The cluster's request router, on Ray Serve's request-router API. The front ranks and splits
its requests itself (`placer`) and names the replica each call is for (`RouteHint.only`): the
router sends it there. A call that names none (the model's description) goes to the replica
`policy` ranks first by the figures the replicas publish.

It also shares what it sees (`view`): the front's placement, /load, /health and /metrics read
the replicas the router routes to and their last figures."""

from __future__ import annotations

from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from chatqueue.cluster import view
from chatqueue.cluster.policy import Candidate, RouteHint, rank
from chatqueue.cluster.stats import ReplicaStats


class ChatQueueRouter(RequestRouter):
    def initialize_state(self, **kwargs: Any) -> None:
        view.publish(self.app_name, self)

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        candidates = [
            Candidate(rid, ReplicaStats.from_dict(r.routing_stats)) for rid, r in by_id.items()
        ]
        order = rank(candidates, hint_of(pending_request))
        # NOTE: one replica a rank, so Serve asks them in exactly this order.
        return [[by_id[rid]] for rid in order]

    def replica_stats(self) -> list[tuple[str, ReplicaStats | None]]:
        """Every replica Serve routes to now, with its last figures (None: none yet)."""
        replicas = list(self.curr_replicas.values())
        return [(r.replica_id.unique_id, ReplicaStats.from_dict(r.routing_stats)) for r in replicas]


def hint_of(pending_request: PendingRequest | None) -> RouteHint:
    route = pending_request.kwargs.get("route") if pending_request is not None else None
    return route if isinstance(route, RouteHint) else RouteHint()

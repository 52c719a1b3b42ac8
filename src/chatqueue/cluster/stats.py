"""What a replica tells the router about itself (Serve's `record_routing_stats`), as one typed
record: its queue's figures, its state, and where it runs. Plain data; no Ray here."""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True, slots=True)
class ReplicaStats:
    replica: str  # Serve's unique id of the replica within the deployment
    state: str  # ChatQueue.health: ready, loading, restarting, failed, unhealthy, shutting_down
    running: int
    waiting: int
    max_concurrent: int
    max_queue_size: int
    drain_rate_per_s: float | None  # completions a second, None before the first
    tokens_per_s: float
    admitted: int  # requests this replica has admitted since it started
    sampled_at: float  # the replica's wall clock when these were read (time.time())
    node: str = ""
    pid: int = 0
    link: str = ""  # host:port of the replica's line for fronts (`link`), "" if none

    @property
    def is_ready(self) -> bool:
        return self.state == "ready"

    @property
    def occupied(self) -> int:
        return self.running + self.waiting

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, stats: dict[str, Any]) -> ReplicaStats | None:
        """None for what is not a whole record: a replica that has not reported yet gives {}."""
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING}
        if not required <= stats.keys():
            return None
        return cls(**{k: v for k, v in stats.items() if k in names})

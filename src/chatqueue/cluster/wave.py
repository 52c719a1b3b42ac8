"""The typed messages of a placement: the front asks a replica to take a wave of requests (those
that arrived together and were planned for it) in one call, and the replica answers for each.
Plain data; no Ray here."""

from __future__ import annotations

from dataclasses import dataclass

from chatqueue.api.wire import Admitted, Refused, Submission
from chatqueue.cluster.stats import ReplicaStats


@dataclass(frozen=True, slots=True)
class Wave:
    """Requests for one replica, in the order they should be taken."""

    front: str  # the front that placed them: its channel carries their events
    submissions: tuple[Submission, ...]
    slots_only: bool  # take only what starts at once (a free slot); leave the rest untaken


@dataclass(frozen=True, slots=True)
class WaveAnswer:
    """The replica's answer, one outcome a submission: `Admitted`, `Refused`, or None (not taken:
    no free slot left, for a wave that asked for slots only). `stats` are the replica's figures
    just after; `replica` says who answered (another one than asked: the one asked is gone)."""

    replica: str
    outcomes: tuple[Admitted | Refused | None, ...]
    stats: ReplicaStats | None

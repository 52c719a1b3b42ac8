"""What the front knows of each replica between two of its stats: the freshest figures (the
router's, or a replica's answer to a placement, whichever was sampled later), corrected by what
this front has placed there and seen end since they were sampled. Plain data; no Ray here.

NOTE: errs both ways, on purpose. An end the front hears after the replica's figures were taken
but that happened before is subtracted twice: the replica looks freer than it is, which costs a
refusal (a replica takes no more than its free slots) and one more call, never a wrong answer.
Requests other fronts placed since are not seen until the next figures come."""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence

from chatqueue.cluster.policy import Candidate
from chatqueue.cluster.stats import ReplicaStats


class Ledger:
    def __init__(self) -> None:
        self._fresh: dict[str, ReplicaStats] = {}  # by replica: from its last answer
        self._changes: dict[str, list[tuple[float, int]]] = {}  # by replica: (when, +1 / -1)
        self._order = itertools.count(1)
        self._last_chosen: dict[str, int] = {}

    def answered(self, stats: ReplicaStats) -> None:
        """A replica's figures as it answered a placement (its admissions in them)."""
        known = self._fresh.get(stats.replica)
        if known is None or known.sampled_at < stats.sampled_at:
            self._fresh[stats.replica] = stats

    def admitted(self, replica: str, at: float) -> None:
        """`at`: when the figures that count it were sampled (the answer's), else now."""
        self._changes.setdefault(replica, []).append((at, 1))
        self._last_chosen[replica] = next(self._order)

    def ended(self, replica: str) -> None:
        self._changes.setdefault(replica, []).append((time.time(), -1))

    def freshest(
        self, rows: Sequence[tuple[str, ReplicaStats | None]]
    ) -> list[tuple[str, ReplicaStats | None]]:
        """The replicas the router sees now (`view`), each with the freshest figures known."""
        return [(replica, self._newer(replica, stats)) for replica, stats in rows]

    def _newer(self, replica: str, stats: ReplicaStats | None) -> ReplicaStats | None:
        fresh = self._fresh.get(replica)
        if stats is None or (fresh is not None and fresh.sampled_at > stats.sampled_at):
            return fresh
        return stats

    def candidates(self, rows: Sequence[tuple[str, ReplicaStats | None]]) -> list[Candidate]:
        """The replicas, as the ranking takes them: the freshest figures, and what this front
        placed and saw end since."""
        out = [
            Candidate(replica, stats, self._since(replica, stats), self._chosen(replica))
            for replica, stats in self.freshest(rows)
        ]
        self._forget_all_but({replica for replica, _ in rows})
        return out

    def _since(self, replica: str, stats: ReplicaStats | None) -> int:
        changes = self._changes.get(replica)
        if not changes or stats is None:
            return 0
        changes[:] = [(at, d) for at, d in changes if at > stats.sampled_at]
        return sum(d for _, d in changes)

    def _chosen(self, replica: str) -> int:
        return self._last_chosen.get(replica, 0)

    def _forget_all_but(self, replicas: set[str]) -> None:
        for known in (self._fresh, self._changes, self._last_chosen):
            for gone in known.keys() - replicas:
                del known[gone]  # type: ignore[attr-defined]

"""Where a request goes: the order in which the front's placement (`placement`) considers the
replicas for each request. Plain data and one function, no Ray, so that every rule is tested
without a cluster.

NOTE: the rules. A replica's stats are up to one stats period old (`STATS_PERIOD_S`, plus the
controller's broadcast), so the front adds what it has itself placed there and seen end since
they were sampled (`in_flight`, from its `ledger`). Then, in order:
1. replicas with a free slot (most free first; ties to the one chosen least recently, so equal
   replicas take turns). A conversation's replica (`prefer`) comes first if it has one;
2. replicas with queue places, by expected wait (places ahead of a newcomer / drain rate; by
   places ahead while a replica has no drain rate yet). `prefer` comes first unless it is
   clearly busier: an expected wait more than twice the best one plus a second (places: twice
   plus one);
3. replicas whose stats say full, least over first: stats are old, they may have room now, and
   admission is exact only if every healthy replica has been asked before a 429;
4. replicas that have not reported yet (just started);
and never a replica that is loading, restarting, failed, hung or draining, nor one this request
has been refused by already (`tried`). With none left, the tried ones come back (the front then
knows every replica refused), else the unhealthy ones (whose refusal says why: loading, ...).
A call for one replica (`only`: a wave, an abort, the front's channel) goes there whatever its
figures.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from chatqueue.cluster.stats import ReplicaStats
from chatqueue.types import ChatMessage

STICKY_WAIT_FACTOR = 2.0
STICKY_WAIT_SLACK_S = 1.0
STICKY_PLACES_SLACK = 1


@dataclass(frozen=True, slots=True)
class RouteHint:
    """What the front tells the ranking (and the router, for a call) about one request."""

    tried: tuple[str, ...] = ()  # replicas that refused this request already
    prefer: str | None = None  # the replica that served this conversation's last turn
    only: str | None = None  # a call for this replica alone (the front's channel to it)


@dataclass(frozen=True, slots=True)
class Candidate:
    replica: str
    stats: ReplicaStats | None
    in_flight: int = 0  # placed there less ended, by this front, since `stats` were sampled
    last_chosen: float = field(default=0.0, compare=False)

    @property
    def occupied(self) -> int:
        assert self.stats is not None
        return self.stats.occupied + self.in_flight

    @property
    def free_slots(self) -> int:
        """Slots a newcomer would find free: the waiting take the free slots first."""
        assert self.stats is not None
        return self.stats.max_concurrent - self.occupied

    @property
    def free_places(self) -> int:
        assert self.stats is not None
        return self.stats.max_concurrent + self.stats.max_queue_size - self.occupied

    @property
    def places_ahead(self) -> int:
        """Requests that would take a slot before a newcomer does."""
        assert self.stats is not None
        return self.occupied + 1 - self.stats.max_concurrent

    @property
    def expected_wait_s(self) -> float:
        assert self.stats is not None
        rate = self.stats.drain_rate_per_s
        return self.places_ahead / rate if rate else math.inf


def rank(candidates: list[Candidate], hint: RouteHint) -> list[str]:
    """Replica ids in the order they should be asked (see the module's NOTE)."""
    if hint.only is not None:
        # NOTE: a replica that is gone cannot be asked; any other answers at once that it is
        # not the one meant, rather than the call waiting for good.
        ids = [c.replica for c in candidates]
        return [hint.only] if hint.only in ids else ids[:1]
    left = [c for c in candidates if c.replica not in hint.tried]
    ready = [c for c in left if c.stats is not None and c.stats.is_ready]
    with_slot = sorted(
        (c for c in ready if c.free_slots > 0), key=lambda c: (-c.free_slots, c.last_chosen)
    )
    with_place = sorted(
        (c for c in ready if c.free_slots <= 0 < c.free_places),
        key=lambda c: (c.expected_wait_s, c.places_ahead, c.last_chosen),
    )
    full = sorted(
        (c for c in ready if c.free_places <= 0), key=lambda c: (-c.free_places, c.last_chosen)
    )
    _prefer(with_slot, hint.prefer)
    if not with_slot and with_place and not _clearly_busier(with_place, hint.prefer):
        _prefer(with_place, hint.prefer)
    unknown = [c for c in left if c.stats is None]
    order = [c.replica for c in (*with_slot, *with_place, *full, *unknown)]
    if order:
        return order
    tried = [c.replica for c in candidates if c.replica in hint.tried]
    return tried or [c.replica for c in left]


def _prefer(ranked: list[Candidate], replica: str | None) -> None:
    at = next((i for i, c in enumerate(ranked) if c.replica == replica), None)
    if at is not None:
        ranked.insert(0, ranked.pop(at))


def _clearly_busier(with_place: list[Candidate], replica: str | None) -> bool:
    sticky = next((c for c in with_place if c.replica == replica), None)
    if sticky is None:
        return True
    best = with_place[0]
    if math.isfinite(best.expected_wait_s) and math.isfinite(sticky.expected_wait_s):
        limit = STICKY_WAIT_FACTOR * best.expected_wait_s + STICKY_WAIT_SLACK_S
        return sticky.expected_wait_s > limit
    return sticky.places_ahead > STICKY_WAIT_FACTOR * best.places_ahead + STICKY_PLACES_SLACK


def conversation_key(messages: Sequence[ChatMessage]) -> str:
    """What identifies a conversation to the router: its opening (the messages before its first
    reply), which every later turn's prompt starts with."""
    first_reply = next((i for i, m in enumerate(messages) if m.role == "assistant"), len(messages))
    digest = hashlib.blake2b(digest_size=16)
    for m in messages[:first_reply]:
        digest.update(f"{m.role}\0{m.content}\0".encode())
    return digest.hexdigest()

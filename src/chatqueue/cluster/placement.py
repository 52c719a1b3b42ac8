"""Which replica a wave's requests are asked of, one round at a time: the plan the front sends,
one call a replica. Plain data and one function, no Ray, so that it is tested without a cluster.

NOTE: the rounds. A batch is placed in two passes, free slots first, then queue places, so that
no request waits in a queue while a replica has a free slot. In each round every request left
goes to the first replica in `policy.rank`'s order for it (its conversation's replica preferred)
that has room of the pass's kind by the figures, the requests already planned counted in. The
requests no replica has room for by the figures all go to the best-ranked replica not yet
`closed` (figures may be old: it takes what it has room for and refuses the rest). A replica
that refuses anything is closed for the pass, so each round places requests or closes a replica,
and every healthy replica has been asked before a request is refused for want of room."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Collection, Sequence

from chatqueue.cluster.policy import Candidate, RouteHint, rank


def plan_round(
    prefers: Sequence[str | None],
    candidates: Sequence[Candidate],
    *,
    slots_only: bool,
    closed: Collection[str],
) -> dict[str, list[int]]:
    """Request indexes (into `prefers`: each one's preferred replica) by the replica to ask."""
    planned: Counter[str] = Counter()
    out: dict[str, list[int]] = {}
    leftover_to: str | None = None
    tried = tuple(closed)
    for i, prefer in enumerate(prefers):
        counted = [
            dataclasses.replace(c, in_flight=c.in_flight + planned[c.replica]) for c in candidates
        ]
        room = {c.replica: _room(c, slots_only=slots_only) for c in counted}
        order = [r for r in rank(counted, RouteHint(tried, prefer)) if r not in closed]
        if not order:
            break
        choice = next((r for r in order if room[r] > 0), None)
        if choice is None:
            leftover_to = leftover_to or order[0]
            choice = leftover_to
        out.setdefault(choice, []).append(i)
        planned[choice] += 1
    return out


def _room(c: Candidate, *, slots_only: bool) -> int:
    if c.stats is None or not c.stats.is_ready:
        return 0
    return c.free_slots if slots_only else c.free_places

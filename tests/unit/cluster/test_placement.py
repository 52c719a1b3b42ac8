"""How a wave is split between replicas (chatqueue.cluster.placement) and what the front's ledger
counts between two stats (chatqueue.cluster.ledger), on hand-made figures."""

from __future__ import annotations

from chatqueue.cluster.ledger import Ledger
from chatqueue.cluster.placement import plan_round
from tests.unit.cluster.test_policy import c, stats


def test_a_wave_is_split_by_free_slots_most_free_first() -> None:
    plan = plan_round(
        [None] * 5, [c("a", running=1, slots=4), c("b", running=0, slots=2)], slots_only=True,
        closed=set(),
    )  # fmt: skip
    assert sorted(plan) == ["a", "b"]
    assert len(plan["a"]) == 3 and len(plan["b"]) == 2


def test_requests_no_replica_has_room_for_go_to_the_best_one_left_to_ask() -> None:
    """Figures may be old: the requests over every free slot go to one replica not yet closed,
    which takes what it has and refuses the rest; a closed one is not asked again."""
    full = [c("a", running=2), c("b", running=2, waiting=1)]
    assert plan_round([None] * 3, full, slots_only=True, closed=set()) == {"a": [0, 1, 2]}
    assert plan_round([None] * 3, full, slots_only=True, closed={"a"}) == {"b": [0, 1, 2]}
    assert plan_round([None] * 3, full, slots_only=True, closed={"a", "b"}) == {}


def test_queue_places_go_to_the_shortest_wait_once_no_slot_is_free() -> None:
    slow = c("slow", running=2, waiting=0, rate=0.5, places=2)
    fast = c("fast", running=2, waiting=0, rate=4.0, places=2)
    plan = plan_round([None] * 3, [slow, fast], slots_only=False, closed=set())
    assert plan == {"fast": [0, 1], "slow": [2]}


def test_a_conversation_goes_to_its_replica_while_it_has_a_free_slot() -> None:
    plan = plan_round(
        [None, "b", None], [c("a", running=0), c("b", running=1)], slots_only=True, closed=set()
    )
    assert plan == {"a": [0, 2], "b": [1]}


def test_the_ledger_counts_what_was_placed_and_ended_since_the_figures() -> None:
    ledger = Ledger()
    old = stats("a", running=1)  # sampled_at 0
    ledger.admitted("a", at=10.0)
    ledger.admitted("a", at=10.0)
    ledger.ended("a")
    (a,) = ledger.candidates([("a", old)])
    assert a.in_flight == 1 and a.free_slots == 0
    # a later answer counts the two admissions itself: only the end after it still counts
    fresh = stats("a", running=3, slots=4)
    ledger.answered(fresh.__class__(**{**fresh.as_dict(), "sampled_at": 10.0}))
    (a,) = ledger.candidates([("a", old)])
    assert a.stats is not None and a.stats.running == 3 and a.in_flight == -1
    assert ledger.candidates([]) == [] and ledger.candidates([("a", None)])[0].stats is None

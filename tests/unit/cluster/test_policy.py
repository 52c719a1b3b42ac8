"""The cluster's routing rules (chatqueue.cluster.policy), on hand-made replica figures."""

from __future__ import annotations

import pickle

from chatqueue.cluster.policy import Candidate, RouteHint, conversation_key, rank
from chatqueue.cluster.stats import ReplicaStats
from chatqueue.errors import QueueFull, ReplicaLost, UserQueueFull
from chatqueue.types import ChatMessage


def stats(
    replica: str,
    *,
    running: int = 0,
    waiting: int = 0,
    state: str = "ready",
    rate: float | None = None,
    slots: int = 2,
    places: int = 2,
) -> ReplicaStats:
    return ReplicaStats(
        replica=replica,
        state=state,
        running=running,
        waiting=waiting,
        max_concurrent=slots,
        max_queue_size=places,
        drain_rate_per_s=rate,
        tokens_per_s=0.0,
        admitted=0,
        sampled_at=0.0,
    )


def c(replica: str, *, in_flight: int = 0, last: float = 0, **figures: object) -> Candidate:
    return Candidate(replica, stats(replica, **figures), in_flight, last)  # type: ignore[arg-type]


def test_a_free_slot_wins_over_a_queue_and_the_most_free_first() -> None:
    order = rank([c("a", running=2), c("b", running=1), c("c", running=0)], RouteHint())
    assert order == ["c", "b", "a"]


def test_equal_replicas_take_turns_least_recently_chosen_first() -> None:
    assert rank([c("a", last=2), c("b", last=1)], RouteHint()) == ["b", "a"]


def test_what_the_router_sent_since_the_stats_counts() -> None:
    """b's stats say two free slots, but two requests went there since: a's one is the one."""
    order = rank([c("a", running=1), c("b", in_flight=2)], RouteHint())
    assert order[0] == "a"


def test_without_a_free_slot_the_shortest_expected_wait_wins() -> None:
    slow = c("slow", running=2, waiting=1, rate=0.5, places=4)  # 2 ahead at 0.5/s: 4 s
    fast = c("fast", running=2, waiting=1, rate=4.0, places=4)  # 2 ahead at 4/s: 0.5 s
    fewer = c("fewer", running=2, waiting=0, places=4)  # no rate yet: after the known ones
    assert rank([slow, fewer, fast], RouteHint()) == ["fast", "slow", "fewer"]


def test_full_replicas_are_still_asked_last_since_their_stats_may_be_old() -> None:
    order = rank([c("full", running=2, waiting=2), c("room", running=2, waiting=1)], RouteHint())
    assert order == ["room", "full"]


def test_loading_failed_and_draining_replicas_get_nothing_while_another_can() -> None:
    cands = [
        c("loading", state="loading"),
        c("failed", state="failed"),
        c("draining", state="shutting_down"),
        c("ok", running=2, waiting=2),
    ]
    assert rank(cands, RouteHint()) == ["ok"]


def test_a_replica_not_heard_from_yet_comes_after_the_known_ones() -> None:
    assert rank([Candidate("new", None), c("known", running=2)], RouteHint()) == ["known", "new"]


def test_replicas_that_refused_are_not_asked_again_until_none_is_left() -> None:
    cands = [c("a"), c("b")]
    assert rank(cands, RouteHint(tried=("a",))) == ["b"]
    assert rank(cands, RouteHint(tried=("a", "b"))) == ["a", "b"]


def test_with_only_unhealthy_replicas_they_are_asked_and_say_why() -> None:
    assert rank([c("a", state="loading")], RouteHint()) == ["a"]


def test_a_conversation_keeps_its_replica_while_it_has_a_free_slot() -> None:
    cands = [c("mine", running=1), c("idle")]
    assert rank(cands, RouteHint(prefer="mine"))[0] == "mine"
    assert rank(cands, RouteHint())[0] == "idle"


def test_a_conversation_moves_when_its_replica_is_clearly_busier() -> None:
    busy = c("mine", running=2, waiting=1, places=4, rate=1.0)  # 2 ahead: 2 s
    free = c("other", running=1)
    assert rank([busy, free], RouteHint(prefer="mine"))[0] == "other"
    a_bit = c("mine", running=2, waiting=1, places=4, rate=1.0)  # 2 s
    best = c("other", running=2, waiting=0, places=4, rate=1.0)  # 1 s: not clearly better
    assert rank([a_bit, best], RouteHint(prefer="mine"))[0] == "mine"
    much = c("mine", running=2, waiting=3, places=4, rate=1.0)  # 4 s > 2 x 1 s + 1 s
    assert rank([much, best], RouteHint(prefer="mine"))[0] == "other"


def test_stats_that_are_not_a_whole_record_are_none() -> None:
    assert ReplicaStats.from_dict({}) is None
    whole = stats("a", running=1)
    assert ReplicaStats.from_dict(whole.as_dict()) == whole


def test_a_conversation_is_known_by_its_opening_in_every_turn() -> None:
    first = [ChatMessage("system", "be kind"), ChatMessage("user", "hi")]
    later = [*first, ChatMessage("assistant", "hello"), ChatMessage("user", "and?")]
    other = [ChatMessage("system", "be kind"), ChatMessage("user", "ho")]
    assert conversation_key(first) == conversation_key(later) != conversation_key(other)


def test_domain_errors_cross_processes_whole() -> None:
    """A replica's refusal reaches the front pickled, with its kind and Retry-After."""
    full = pickle.loads(pickle.dumps(QueueFull("full", retry_after_s=3)))
    assert type(full) is QueueFull and (full.message, full.retry_after_s) == ("full", 3)
    mine = pickle.loads(pickle.dumps(UserQueueFull("mine", retry_after_s=2)))
    assert type(mine) is UserQueueFull and mine.kind == "user_queue_full"
    lost = pickle.loads(pickle.dumps(ReplicaLost()))
    assert lost.kind == "replica_lost" and lost.retry_after_s == 1


def test_a_channel_goes_to_the_replica_it_names_whatever_its_figures() -> None:
    """A front's channel to one replica (RouteHint.only): that replica even when full or not
    ready; when it is gone, any other one, which answers at once that it is not the one."""
    full = c("a", running=2, waiting=2, state="loading")
    free = c("b")
    assert rank([free, full], RouteHint(only="a")) == ["a"]
    assert rank([free], RouteHint(only="a")) == ["b"]
    assert rank([], RouteHint(only="a")) == []

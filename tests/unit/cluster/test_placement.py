"""How a wave is split between replicas (chatqueue.cluster.placement), what the front's ledger
counts between two stats (chatqueue.cluster.ledger), and the replica count autoscaling asks for
(chatqueue.cluster.scaling), on hand-made figures."""

from __future__ import annotations

from types import SimpleNamespace

from chatqueue.cluster.ledger import Ledger
from chatqueue.cluster.placement import plan_round
from chatqueue.cluster.scaling import desired_replicas, replicas_for_queue_depth
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


def context(running: dict[str, float], waiting: dict[str, float], *, current: int) -> object:
    config = SimpleNamespace(get_target_ongoing_requests=lambda: 4)
    metrics = {"running": running, "waiting": waiting} if running or waiting else {}
    return SimpleNamespace(
        aggregated_metrics=metrics,
        current_num_replicas=current,
        target_num_replicas=current,
        config=config,
    )


def test_autoscaling_asks_for_a_replica_a_max_concurrent_of_held_requests() -> None:
    """4 slots a replica: 2 replicas holding 4 running and 6 waiting want 2.5 (Serve's wrapper
    rounds up and bounds it); idle, none (the minimum holds); with no figures yet, as many as
    now."""
    busy = context({"r1": 4, "r2": 0}, {"r1": 6, "r2": 0}, current=2)
    assert replicas_for_queue_depth(busy)[0] == 2.5
    idle = context({"r1": 0, "r2": 0}, {"r1": 0, "r2": 0}, current=2)
    assert replicas_for_queue_depth(idle)[0] == 0
    assert replicas_for_queue_depth(context({}, {}, current=3))[0] == 3
    assert desired_replicas(8, 4) == 2 and desired_replicas(8, 0) == 0


def test_serve_takes_the_autoscaling_config_with_the_replicas_own_figures() -> None:
    """`--min-replicas 1 --max-replicas 4`: Serve parses the config, loads the policy by its
    path, and the policy reads a real AutoscalingContext's figures."""
    from ray.serve.config import AutoscalingConfig, AutoscalingContext

    from chatqueue.cluster.deploy import _scaling
    from chatqueue.config import Settings

    settings = Settings(engine="mock", min_replicas=1, max_replicas=4, max_concurrent=4)
    config = AutoscalingConfig(**_scaling(settings)["autoscaling_config"])
    policy = config.policy.get_policy()
    assert policy.__name__ == replicas_for_queue_depth.__name__
    ctx = AutoscalingContext(
        deployment_id=None,  # type: ignore[arg-type]
        deployment_name="ChatQueueReplica",
        app_name="chatqueue",
        current_num_replicas=1,
        target_num_replicas=1,
        running_replicas=[],
        total_num_requests=0.0,  # Serve's own count: a replica's channel, whatever it holds
        total_queued_requests=0.0,
        aggregated_metrics={"running": {"r1": 4.0}, "waiting": {"r1": 8.0}},  # type: ignore[dict-item]
        raw_metrics=None,
        capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=4,
        policy_state={},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=0.0,
        config=config,
    )
    assert policy(ctx)[0] == 3.0

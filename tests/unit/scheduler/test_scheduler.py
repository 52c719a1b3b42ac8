"""The scheduler with no model and no network: hand-made requests, a fake clock."""

from __future__ import annotations

import itertools

import pytest

from chatqueue.errors import InvalidRequest, QueueFull, ShuttingDown, UserQueueFull
from chatqueue.scheduler import Request, RequestState, Scheduler
from chatqueue.scheduler.blocks import BlockManager
from chatqueue.server.errors import status_of
from chatqueue.types import FinishReason

_ids = itertools.count(1)


def req(user: str = "", priority: int = 0, arrival: float = 0.0, deadline: float | None = None):
    return Request(rid=next(_ids), arrival=arrival, user=user, priority=priority, deadline=deadline)


def make(max_concurrent: int = 2, max_queue_size: int = 3, **kw: object) -> Scheduler:
    return Scheduler(max_concurrent=max_concurrent, max_queue_size=max_queue_size, **kw)  # type: ignore[arg-type]


def test_waiting_requests_fill_free_slots_in_order() -> None:
    s = make(max_concurrent=2, max_queue_size=3)
    a, b, c = req(), req(), req()
    for r in (a, b, c):
        s.add(r, 0)
    plan = s.schedule(0)
    assert plan.admitted == [a, b]
    assert [r.state for r in (a, b, c)] == [RequestState.RUNNING] * 2 + [RequestState.WAITING]
    assert s.num_running == 2 and s.num_waiting == 1


def test_cap_holds_and_a_finish_frees_a_slot_at_the_next_step() -> None:
    s = make(max_concurrent=1, max_queue_size=2)
    a, b = req(), req()
    s.add(a, 0)
    s.add(b, 0)
    assert s.schedule(0).admitted == [a]
    assert s.schedule(1).admitted == []
    s.finish(a, FinishReason.STOP, 2)
    plan = s.schedule(2)
    assert plan.admitted == [b] and plan.released == [a]
    assert a.finish_reason is FinishReason.STOP


def test_bound_is_exact_a_burst_of_free_slots_plus_queue_is_accepted_whole() -> None:
    s = make(max_concurrent=3, max_queue_size=4)
    for _ in range(7):  # N + q, all before any step
        s.add(req(), 0)
    with pytest.raises(QueueFull) as exc:
        s.add(req(), 0)
    assert status_of(exc.value) == 429 and exc.value.retry_after_s >= 1
    s.schedule(0)
    assert s.num_running == 3 and s.num_waiting == 4


def test_bound_counts_running_ones_being_aborted_as_free() -> None:
    s = make(max_concurrent=1, max_queue_size=0)
    a = req()
    s.add(a, 0)
    s.schedule(0)
    with pytest.raises(QueueFull):
        s.add(req(), 0)
    s.abort(a)
    s.add(req(), 0)  # a's slot is free at the next step


def test_abort_while_waiting_leaves_at_once() -> None:
    s = make(max_concurrent=1, max_queue_size=2)
    a, b, c = req(), req(), req()
    for r in (a, b, c):
        s.add(r, 0)
    s.schedule(0)
    assert s.abort(b) is True
    assert b.state is RequestState.FINISHED and b.finish_reason is FinishReason.ABORT
    assert [r for r, _ in s.positions()] == [c]


def test_abort_while_running_leaves_at_the_next_step() -> None:
    s = make(max_concurrent=1, max_queue_size=1)
    a, b = req(), req()
    s.add(a, 0)
    s.add(b, 0)
    s.schedule(0)
    assert s.abort(a) is False
    assert a.state is RequestState.RUNNING  # until the step ends
    plan = s.schedule(1)
    assert plan.aborted == [a] and plan.released == [a] and plan.admitted == [b]
    assert a.finish_reason is FinishReason.ABORT
    assert s.abort(a) is False  # twice is harmless


def test_positions_and_eta_from_the_drain_rate() -> None:
    s = make(max_concurrent=2, max_queue_size=10)
    first = [req() for _ in range(2)]
    waiting = [req() for _ in range(3)]
    for r in first + waiting:
        s.add(r, 0.0)
    s.schedule(0.0)
    assert [(r, p) for r, p in s.positions()] == list(zip(waiting, [1, 2, 3], strict=True))
    assert s.eta(1, 0.0) is None  # nothing has completed yet: unknown, not invented
    s.finish(first[0], FinishReason.STOP, 2.0)
    s.finish(first[1], FinishReason.LENGTH, 4.0)
    # 2 completions in 4 busy seconds: 0.5/s; position 3 has 3 ahead of it once slots are full
    s.schedule(4.0)
    assert s.drain.rate(4.0) == pytest.approx(0.5)
    assert [p for _, p in s.positions()] == [1]
    assert s.eta(1, 4.0) == pytest.approx(2.0)
    assert s.eta(3, 4.0) == pytest.approx(6.0)
    assert s.retry_after(4.0) == 2


def test_eta_is_zero_for_positions_that_fit_free_slots() -> None:
    s = make(max_concurrent=4, max_queue_size=4)
    s.add(req(), 0)
    assert s.eta(1, 0) == 0.0


def test_drain_rate_forgets_idle_time() -> None:
    s = make(max_concurrent=1, max_queue_size=1)
    a = req()
    s.add(a, 0)
    s.schedule(0)
    s.finish(a, FinishReason.STOP, 1)
    s.schedule(1)  # idle now
    assert s.drain.rate(1000) is None
    b = req(arrival=1000)
    s.add(b, 1000)
    s.schedule(1000)
    s.finish(b, FinishReason.STOP, 1004)
    assert s.drain.rate(1004) == pytest.approx(0.25)


def test_retry_after_falls_back_before_any_completion() -> None:
    s = make(retry_after_fallback_s=3)
    assert s.retry_after(0) == 3


def test_finish_reasons_are_recorded() -> None:
    s = make(max_concurrent=3, max_queue_size=0)
    rs = [req() for _ in range(3)]
    for r in rs:
        s.add(r, 0)
    s.schedule(0)
    for r, reason in zip(
        rs, [FinishReason.STOP, FinishReason.LENGTH, FinishReason.ERROR], strict=True
    ):
        s.finish(r, reason, 1)
    assert [r.finish_reason for r in rs] == ["stop", "length", "error"]
    assert s.schedule(1).released == rs
    assert not s.has_work


def test_users_take_turns_and_positions_follow_the_fair_order() -> None:
    s = make(max_concurrent=1, max_queue_size=100)
    blocker = req("z")
    s.add(blocker, 0)
    s.schedule(0)
    a_reqs = [req("a") for _ in range(50)]
    for r in a_reqs:
        s.add(r, 0)
    b = req("b")
    s.add(b, 0)
    assert dict((r.rid, p) for r, p in s.positions())[b.rid] == 2  # after one turn of a's
    s.finish(blocker, FinishReason.STOP, 1)
    assert s.schedule(1).admitted == [a_reqs[0]]
    s.finish(a_reqs[0], FinishReason.STOP, 2)
    assert s.schedule(2).admitted == [b]


def test_higher_priority_is_admitted_first_then_fairly() -> None:
    s = make(max_concurrent=1, max_queue_size=10)
    low, high1, high2 = req("a", 0), req("b", 5), req("c", 5)
    for r in (low, high1, high2):
        s.add(r, 0)
    assert [r for r, _ in s.positions()] == [high1, high2, low]


def test_per_user_queue_cap() -> None:
    s = make(max_concurrent=1, max_queue_size=10, max_queue_per_user=2)
    s.add(req("a"), 0)
    s.add(req("a"), 0)
    with pytest.raises(UserQueueFull):
        s.add(req("a"), 0)
    s.add(req("b"), 0)


def test_a_request_may_carry_its_users_own_cap() -> None:
    s = make(max_concurrent=1, max_queue_size=10, max_queue_per_user=2)
    s.add(Request(rid=next(_ids), arrival=0, user="a", max_queue_per_user=1), 0)
    with pytest.raises(UserQueueFull):
        s.add(Request(rid=next(_ids), arrival=0, user="a", max_queue_per_user=1), 0)
    for _ in range(3):  # a larger own cap lifts the server's
        s.add(Request(rid=next(_ids), arrival=0, user="b", max_queue_per_user=3), 0)


def test_the_cap_counts_a_requests_cap_key_when_it_has_one() -> None:
    """A client that names another `user` on every request still counts as its cap key; the
    users still take turns."""
    s = make(max_concurrent=1, max_queue_size=10, max_queue_per_user=2)
    first, second = (Request(rid=next(_ids), arrival=0, user=u, cap_key="addr") for u in "xy")
    s.add(first, 0)
    s.add(second, 0)
    with pytest.raises(UserQueueFull):
        s.add(Request(rid=next(_ids), arrival=0, user="z", cap_key="addr"), 0)
    s.add(Request(rid=next(_ids), arrival=0, user="z", cap_key="other"), 0)
    plan = s.schedule(0)
    assert plan.batch == [first]
    s.add(Request(rid=next(_ids), arrival=0, user="w", cap_key="addr"), 0)  # a place came free
    with pytest.raises(UserQueueFull):
        s.add(Request(rid=next(_ids), arrival=0, user="x", cap_key="addr"), 0)


def test_deadline_expiry_leaves_the_queue_without_taking_a_slot() -> None:
    s = make(max_concurrent=1, max_queue_size=5)
    a, b = req(), req(deadline=5.0)
    s.add(a, 0)
    s.add(b, 0)
    s.schedule(0)
    assert s.next_deadline() == 5.0
    plan = s.schedule(5.0)
    assert plan.expired == [b] and b.finish_reason is FinishReason.ERROR
    assert s.num_waiting == 0 and s.num_running == 1


def test_closed_scheduler_refuses_but_keeps_what_it_has() -> None:
    s = make()
    a = req()
    s.add(a, 0)
    s.close()
    with pytest.raises(ShuttingDown):
        s.add(req(), 0)
    assert s.schedule(0).admitted == [a]


def test_expire_all_waiting_empties_the_queue() -> None:
    s = make(max_concurrent=1, max_queue_size=5)
    rs = [req() for _ in range(3)]
    for r in rs:
        s.add(r, 0)
    s.schedule(0)
    gone = s.expire_all_waiting(FinishReason.ERROR)
    assert gone == rs[1:] and s.num_waiting == 0


def test_a_request_of_several_choices_needs_a_place_for_each() -> None:
    s = make(max_concurrent=2, max_queue_size=2)
    s.check_room(0, num_places=4)  # empty: all four fit
    s.add(req(), 0)
    with pytest.raises(QueueFull, match="needs 4 places"):
        s.check_room(0, num_places=4)
    s.check_room(0, num_places=3)


def test_more_choices_than_the_server_ever_holds_is_a_400() -> None:
    s = make(max_concurrent=2, max_queue_size=2)
    with pytest.raises(InvalidRequest, match="at most 4") as caught:
        s.check_room(0, num_places=5)
    assert status_of(caught.value) == 400 and caught.value.param == "n"


# -- KV memory ------------------------------------------------------------------------------


def kv_req(num_prompt: int, arrival: float = 0.0) -> Request:
    return Request(rid=next(_ids), arrival=arrival, prompt_ids=list(range(1, num_prompt + 1)))


def kv_scheduler(num_blocks: int, block_size: int = 4, **kw: object) -> Scheduler:
    s = make(**kw)
    s.use_kv(BlockManager(num_blocks=num_blocks, block_size=block_size))
    return s


def decode(s: Scheduler, *reqs: Request) -> None:
    """The runner sampled a token for each: its KV so far is written, the token is pending."""
    for r in reqs:
        s.note_computed(r, r.num_tokens)
        r.output_ids.append(7)


def test_a_request_whose_blocks_are_not_free_waits_and_keeps_its_place() -> None:
    s = kv_scheduler(num_blocks=4, max_concurrent=4, max_queue_size=4)
    a, b, c = kv_req(12), kv_req(8), kv_req(1)  # 3 blocks, 2 blocks, 1 block
    for r in (a, b, c):
        s.add(r, 0)
    plan = s.schedule(0)
    assert plan.admitted == [a]  # b does not fit; c, which would, does not pass it
    assert [(r, p) for r, p in s.positions()] == [(b, 1), (c, 2)]
    assert s.kv is not None and s.kv.num_free_blocks == 1
    s.finish(a, FinishReason.STOP, 1)
    assert s.schedule(1).admitted == [b, c]


def test_decode_that_runs_out_of_blocks_preempts_the_newest_to_the_front() -> None:
    s = kv_scheduler(num_blocks=4, max_concurrent=4, max_queue_size=4)
    old, new, waiting = kv_req(4), kv_req(4), kv_req(1)
    for r in (old, new):
        s.add(r, 0)
    assert s.schedule(0).admitted == [old, new]
    s.add(waiting, 0)
    decode(s, old, new)  # each now holds 5 tokens: a second block each, 4 blocks in all
    plan = s.schedule(1)
    assert sorted(plan.grown) == sorted([old.rid, new.rid]) and plan.admitted == []
    for _ in range(4):
        decode(s, old, new)  # 9 tokens each: the pending one needs a third block each
    plan = s.schedule(2)
    assert plan.preempted == [new] and plan.running == [old] and plan.admitted == []
    assert list(plan.grown) == [old.rid]
    assert new.state is RequestState.WAITING and new.num_preemptions == 1
    assert [r for r, _ in s.positions()] == [new, waiting]  # back at the front
    s.finish(old, FinishReason.STOP, 3)
    plan = s.schedule(3)
    assert plan.admitted[0] is new
    # its blocks were freed, and its full ones kept findable: it recomputes only the rest
    assert plan.allocations[new.rid].num_cached_tokens == 8


def test_a_lone_request_that_outgrows_the_pool_preempts_itself_rather_than_overrun() -> None:
    s = kv_scheduler(num_blocks=2, block_size=2, max_concurrent=2, max_queue_size=2)
    a = kv_req(3)
    s.add(a, 0)
    s.schedule(0)
    decode(s, a)  # 4 tokens: 2 blocks, full
    decode(s, a)
    plan = s.schedule(1)
    assert plan.preempted == [a] and s.kv is not None and s.kv.num_used_blocks == 0


def test_a_preempted_request_has_no_queue_deadline() -> None:
    s = kv_scheduler(num_blocks=2, block_size=2, max_concurrent=2, max_queue_size=2)
    a = Request(rid=next(_ids), arrival=0, deadline=5, prompt_ids=[1, 2, 3])
    s.add(a, 0)
    s.schedule(0)
    decode(s, a)
    decode(s, a)
    s.schedule(1)
    assert a.state is RequestState.WAITING
    assert s.schedule(10).expired == [] and s.next_deadline() is None


def test_turn_two_finds_turn_one_in_the_cache() -> None:
    s = kv_scheduler(num_blocks=16, max_concurrent=2, max_queue_size=2)
    first = kv_req(10)
    s.add(first, 0)
    s.schedule(0)
    decode(s, first)
    decode(s, first)  # the prompt and the first reply token are in the KV now
    s.finish(first, FinishReason.STOP, 1)
    second = Request(rid=next(_ids), arrival=1, prompt_ids=[*first.token_ids(), 50, 51])
    s.add(second, 1)
    s.schedule(1)
    assert second.num_cached_tokens == 8


def test_without_a_pool_admission_is_by_slots_alone() -> None:
    s = make(max_concurrent=2, max_queue_size=2)
    a, b = kv_req(10_000), kv_req(10_000)
    s.add(a, 0)
    s.add(b, 0)
    assert s.schedule(0).admitted == [a, b]

"""Retry-After on a refusal grows with the expected wait and spreads refused clients over it."""

from __future__ import annotations

import random
import statistics

from chatqueue.scheduler import Request, Scheduler
from chatqueue.types import FinishReason


def busy_scheduler(num_waiting: int) -> Scheduler[Request]:
    """One slot; 10 completions in 10 busy seconds (1/s); then `num_waiting` requests wait."""
    s: Scheduler[Request] = Scheduler(max_concurrent=1, max_queue_size=100, rng=random.Random(7))
    rid = 0
    for t in range(10):
        rid += 1
        r = Request(rid=rid, arrival=float(t))
        s.add(r, float(t))
        s.schedule(float(t))
        s.finish(r, FinishReason.STOP, t + 1.0)
    for _ in range(num_waiting):
        rid += 1
        s.add(Request(rid=rid, arrival=10.0), 10.0)
    assert s.drain.rate(10.0) == 1.0
    return s


def test_refused_clients_are_told_different_times_within_the_drain_time() -> None:
    s = busy_scheduler(num_waiting=20)
    told = [s.retry_after_spread(10.0) for _ in range(200)]
    assert min(told) >= 1 and max(told) <= 21  # one completion .. everything waiting drained
    assert len(set(told)) > 10  # spread, not one second for everybody


def test_retry_after_grows_with_the_queue() -> None:
    short = busy_scheduler(num_waiting=2)
    long = busy_scheduler(num_waiting=40)
    assert statistics.mean(long.retry_after_spread(10.0) for _ in range(200)) > 4 * (
        statistics.mean(short.retry_after_spread(10.0) for _ in range(200))
    )


def test_before_any_completion_the_fallback_is_told() -> None:
    s: Scheduler[Request] = Scheduler(max_concurrent=1, max_queue_size=1, retry_after_fallback_s=3)
    assert s.retry_after_spread(0.0) == 3

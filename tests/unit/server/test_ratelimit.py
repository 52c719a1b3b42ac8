"""The token buckets behind --rate-limit, on a hand-driven clock."""

from __future__ import annotations

import pytest

from chatqueue.errors import RateLimited
from chatqueue.server import ratelimit
from chatqueue.server.ratelimit import RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_a_minutes_worth_then_one_per_interval_with_retry_after_the_next_token() -> None:
    clock = Clock()
    limiter = RateLimiter(clock)
    for _ in range(6):
        await limiter.take("a", 6)  # a burst of a minute's worth
    with pytest.raises(RateLimited) as refused:
        await limiter.take("a", 6)
    assert refused.value.kind == "rate_limited" and refused.value.retry_after_s == 10
    clock.now += 4
    with pytest.raises(RateLimited) as refused:
        await limiter.take("a", 6)
    assert refused.value.retry_after_s == 6  # the next token is 6 s away
    clock.now += 6
    await limiter.take("a", 6)
    with pytest.raises(RateLimited):
        await limiter.take("a", 6)


async def test_callers_have_buckets_of_their_own() -> None:
    limiter = RateLimiter(Clock())
    await limiter.take("a", 1)
    with pytest.raises(RateLimited) as refused:
        await limiter.take("a", 1)
    assert refused.value.retry_after_s == 60
    await limiter.take("b", 1)


async def test_full_buckets_are_forgotten(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ratelimit, "PRUNE_AT", 10)
    clock = Clock()
    limiter = RateLimiter(clock)
    for i in range(10):
        await limiter.take(f"old{i}", 60)
    clock.now += 2  # the old callers' buckets are full again
    await limiter.take("new", 60)
    assert len(limiter) == 1

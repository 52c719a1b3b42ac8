"""Requests a minute per caller, a token bucket each: `--rate-limit N`, or a key's own
`rate_limit` in the --api-keys file. Off unless one is set.

A caller is the key's holder when keys name callers, else the client's address. A bucket holds
at most N tokens (a minute's worth, so a caller may burst that much after a quiet minute) and
gains N/60 a second; a request takes one, or is refused with RateLimited, whose Retry-After is
when the next token arrives.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Protocol

from chatqueue.errors import RateLimited

PRUNE_AT = 10_000  # buckets kept before the full ones (as good as absent) are dropped


class Limiter(Protocol):
    """What the routes ask (`app.state.rate_limiter`): this process's buckets (`RateLimiter`),
    or, in an API server beside others, the core's (`fronts.client.CoreLimiter`)."""

    async def take(self, caller: str, per_minute: float) -> None: ...


class RateLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # caller -> (tokens, when)
        self._prune_at = PRUNE_AT

    def __len__(self) -> int:
        return len(self._buckets)

    async def take(self, caller: str, per_minute: float) -> None:
        """One request of `caller`'s, or RateLimited. (Async, as the API servers' limiter is:
        theirs asks the core process, which holds the buckets of all of them.)"""
        now = self._clock()
        tokens = self._tokens(caller, per_minute, now)
        if tokens < 1:
            wait_s = (1 - tokens) * 60 / per_minute
            raise RateLimited(
                f"Too many requests: at most {per_minute:g} a minute. Retry after the time given.",
                retry_after_s=max(1, math.ceil(wait_s)),
            )
        self._buckets[caller] = (tokens - 1, now)
        if len(self._buckets) > self._prune_at:
            self._prune(per_minute, now)

    def _tokens(self, caller: str, per_minute: float, now: float) -> float:
        capacity = max(1.0, per_minute)
        tokens, when = self._buckets.get(caller, (capacity, now))
        return min(capacity, tokens + (now - when) * per_minute / 60)

    def _prune(self, per_minute: float, now: float) -> None:
        # NOTE: a full bucket is the same as none; with callers of different rates, the current
        # one's rate only decides how soon a bucket counts as full.
        capacity = max(1.0, per_minute)
        self._buckets = {
            c: b for c, b in self._buckets.items() if self._tokens(c, per_minute, now) < capacity
        }
        self._prune_at = max(PRUNE_AT, 2 * len(self._buckets))

"""Event-loop lag: how late a timer on the event loop fires. Sampled all the time the queue runs;
the figure that says whether the HTTP side is being kept waiting (by a handler that blocks, by
too much work per loop iteration, by the GIL)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

LAG_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


async def sample_loop_lag(on_sample: Callable[[float, float], None], period_s: float = 0.1) -> None:
    """Forever: sleep `period_s`, then call `on_sample(woke_at, lag_s)`, where `woke_at` is the
    `time.perf_counter()` the timer ran at and `lag_s` how much later than asked. Cancel to stop."""
    while True:
        asked = time.perf_counter() + period_s
        await asyncio.sleep(period_s)
        woke_at = time.perf_counter()
        on_sample(woke_at, max(0.0, woke_at - asked))

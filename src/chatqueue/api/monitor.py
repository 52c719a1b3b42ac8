"""Background watchers a running queue keeps on the event loop: the loop's own lag, and steps that
hang."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


async def sample_loop_lag(on_sample: Callable[[float, float], None], period_s: float = 0.1) -> None:
    """Forever: sleep `period_s`, then call `on_sample(woke_at, lag_s)`, where `woke_at` is the
    `time.perf_counter()` the timer ran at and `lag_s` how much later than asked. Cancel to stop.

    How late a timer fires is the figure that says whether the HTTP side is being kept waiting
    (by a handler that blocks, by too much work per loop iteration, by the GIL)."""
    while True:
        asked = time.perf_counter() + period_s
        await asyncio.sleep(period_s)
        woke_at = time.perf_counter()
        on_sample(woke_at, max(0.0, woke_at - asked))


async def watch_steps(
    check_hung: Callable[[float, float], bool],
    clock: Callable[[], float],
    step_timeout_s: Callable[[], float],
) -> None:
    """Forever: ask `check_hung(now, step_timeout_s())` a few times per timeout, so that a step
    that hangs is ended rather than leave every client hanging. Cancel to stop."""
    while True:
        timeout_s = step_timeout_s()
        await asyncio.sleep(min(1.0, timeout_s / 4))
        check_hung(clock(), timeout_s)

"""How fast running requests complete: the basis of queue ETAs and Retry-After."""

from __future__ import annotations

from collections import deque


class DrainRate:
    """Completions per second over the last `window_s` seconds of busy time.

    Time while the server was idle (nothing running, nothing waiting) does not count, so a quiet
    night does not make the morning's queue look slow.
    """

    def __init__(self, window_s: float = 60.0) -> None:
        self.window_s = window_s
        self._completions: deque[float] = deque()
        self._busy_since: float | None = None

    def mark_busy(self, now: float) -> None:
        if self._busy_since is None:
            self._busy_since = now

    def mark_idle(self) -> None:
        self._busy_since = None
        self._completions.clear()

    def record(self, now: float) -> None:
        self.mark_busy(now)
        self._completions.append(now)
        self._forget_before(now - self.window_s)  # busy for hours, nobody asking: stay small

    def rate(self, now: float) -> float | None:
        """Completions per second, or None before the first completion of this busy period."""
        start = now - self.window_s
        self._forget_before(start)
        if not self._completions or self._busy_since is None:
            return None
        span = now - max(start, self._busy_since)
        if span <= 0:
            return None
        return len(self._completions) / span

    def _forget_before(self, start: float) -> None:
        while self._completions and self._completions[0] <= start:
            self._completions.popleft()

"""Rolling figures forget what fell out of their window as they are fed, not only when read: a
server that nobody polls for /load must not grow."""

from __future__ import annotations

import pytest

from chatqueue.metrics import _Window
from chatqueue.scheduler.drain import DrainRate


def test_metrics_window_stays_small_without_being_read() -> None:
    now = [0.0]
    window = _Window(10.0, lambda: now[0])
    for i in range(10_000):
        now[0] = i * 0.1
        window.add(1.0)
    assert len(window._samples) <= 101
    assert window.per_second() == pytest.approx(10.0, rel=0.02)  # ~100 samples of 1 in 10 s


def test_drain_rate_stays_small_without_being_read() -> None:
    drain = DrainRate(window_s=60.0)
    for i in range(10_000):
        drain.record(i * 0.1)
    assert len(drain._completions) <= 601
    assert drain.rate(999.9) == pytest.approx(10.0, rel=0.02)


def test_metrics_window_sum_follows_the_samples_in_it() -> None:
    """The kept sum is the sum of what is in the window now, as samples come and go, and
    nothing once all have aged out (no rounding left over)."""
    now = [0.0]
    window = _Window(1.0, lambda: now[0])
    assert window.mean() is None
    values = [0.1, 0.7, 2.5, 1e-3, 3.3]
    for i, value in enumerate(values):
        now[0] = i * 0.4
        window.add(value)
    # at 1.6 s the samples of 0.8 s and later are in: 2.5, 1e-3, 3.3 (0.7 at 0.4 s is out)
    now[0] = 1.6
    assert window.mean() == pytest.approx((2.5 + 1e-3 + 3.3) / 3)
    assert window.per_second() == pytest.approx(2.5 + 1e-3 + 3.3)
    now[0] = 10.0
    assert window.mean() is None
    assert window.per_second() == 0.0
    window.add(0.25)
    assert window.mean() == 0.25

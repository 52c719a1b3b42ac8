"""`chatqueue serve` collects young objects every --gc-threshold allocations, older ones as before."""

from __future__ import annotations

import gc

from chatqueue.server.serve import tune_gc


def test_tune_gc_sets_the_young_threshold_only() -> None:
    before = gc.get_threshold()
    try:
        tune_gc(100_000)
        assert gc.get_threshold() == (100_000, *before[1:])
    finally:
        gc.set_threshold(*before)

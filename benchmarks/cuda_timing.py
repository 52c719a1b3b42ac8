"""Timing on the GPU for the profile scripts (profile_gpu_decode.py, profile_family_decode.py,
micro_decode_attention.py): a captured graph's replays by CUDA events, and a call's wall time
with the device idle before it."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch


def replay_ms(
    graph: Any, times: int = 30, *, after: Callable[[], None] | None = None
) -> list[float]:
    """Milliseconds of device time of each of `times` replays of `graph` (a torch.cuda.CUDAGraph);
    `after` runs after each replay, outside its timing (a replay that moves state on the device
    puts it back there)."""
    elapsed = []
    for _ in range(times):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        elapsed.append(start.elapsed_time(end))
        if after is not None:
            after()
    return elapsed


def wall_ms(call: Callable[[], object], times: int = 30) -> list[float]:
    """Milliseconds of wall time of each of `times` calls, each started with the device idle."""
    elapsed = []
    for _ in range(times):
        torch.cuda.synchronize()
        began = time.perf_counter()
        call()
        elapsed.append((time.perf_counter() - began) * 1e3)
    return elapsed

"""What the benchmarks' servers (gpu_model.py, front_model.py) record on their own event loop."""

from __future__ import annotations

import asyncio
import gc
import os
import time


def add_lag_recorder(app) -> None:  # type: ignore[no-untyped-def]
    """POST /bench/lag starts recording the event-loop lag of a 10 ms timer (chatqueue's own
    sampler, every sample kept) and the garbage collector's pauses; GET /bench/lag returns
    [(perf_counter, lag_s)], GET /bench/gc [(perf_counter at the end, generation, pause_s)].
    Each answers in {"pid": this process, "data": ...}: under --api-servers every API server
    records its own (`_common.from_each_process` asks each)."""
    from chatqueue.api.monitor import sample_loop_lag

    samples: list[tuple[float, float]] = []
    pauses: list[tuple[float, int, float]] = []
    tasks: list[asyncio.Task[None]] = []
    began = [0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            began[0] = time.perf_counter()
        else:
            now = time.perf_counter()
            pauses.append((now, info["generation"], now - began[0]))

    gc.callbacks.append(on_gc)

    @app.get("/bench/gc")
    async def collections() -> dict[str, object]:
        return {"pid": os.getpid(), "data": pauses}

    @app.post("/bench/lag")
    async def start() -> dict[str, object]:
        samples.clear()
        pauses.clear()
        if not tasks:
            on_sample = lambda at, lag: samples.append((at, lag))  # noqa: E731
            tasks.append(asyncio.create_task(sample_loop_lag(on_sample, period_s=0.01)))
        return {"pid": os.getpid(), "data": None}

    @app.get("/bench/lag")
    async def recorded() -> dict[str, object]:
        return {"pid": os.getpid(), "data": samples}

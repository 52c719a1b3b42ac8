"""What one Ray Serve call costs, by kind, side by side (issue 13: the cluster's placement).

A deployment whose methods hold a request for 50 ms; waves of 32 requests at once, sent three
ways: a streaming call each (as the cluster's front places a request today: the first item is the
replica's answer, the call stays open), a unary call each, and one call carrying all 32. Prints
the CPU time of every process on the machine (the driver, Serve's controller and the replica,
Ray's own) per request, the wall time of a wave, and the ratios to the one-call wave. Run it on
an otherwise quiet machine: the CPU figure counts every process.

    .venv/bin/python benchmarks/micro_serve_calls.py [--waves 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import ray
from ray import serve

WAVE = 32
HOLD_S = 0.05


@serve.deployment(max_ongoing_requests=1000)
class Held:
    async def stream(self, x: int) -> AsyncIterator[int]:
        yield x
        await asyncio.sleep(HOLD_S)

    async def unary(self, x: int) -> int:
        await asyncio.sleep(HOLD_S)
        return x

    async def batch(self, xs: list[int]) -> list[int]:
        await asyncio.sleep(HOLD_S)
        return xs


def cpu_seconds() -> float:
    """CPU time of every process this machine shows (Ray's processes are the driver's too)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


async def measure(args: argparse.Namespace) -> None:
    handle = serve.run(Held.bind(), name="micro_serve_calls", route_prefix=None)
    streaming = handle.options(stream=True)

    async def one_stream(i: int) -> None:
        async for _ in streaming.stream.remote(i):  # type: ignore[attr-defined]
            pass

    async def streams() -> None:
        await asyncio.gather(*(one_stream(i) for i in range(WAVE)))

    async def unaries() -> None:
        await asyncio.gather(*(handle.unary.remote(i) for i in range(WAVE)))

    async def one_call() -> None:
        await handle.batch.remote(list(range(WAVE)))

    kinds: dict[str, Callable[[], Awaitable[None]]] = {
        "a streaming call each": streams,
        "a unary call each": unaries,
        "one call for the wave": one_call,
    }
    cpu: dict[str, list[float]] = {k: [] for k in kinds}
    wall: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(args.rounds):
        for name, wave in kinds.items():  # in turn, round after round
            await wave()  # warm
            c0, t0 = cpu_seconds(), time.perf_counter()
            for _ in range(args.waves):
                await wave()
            c1, t1 = cpu_seconds(), time.perf_counter()
            cpu[name].append((c1 - c0) / (args.waves * WAVE))
            wall[name].append((t1 - t0) / args.waves)
    base = "one call for the wave"
    print(f"waves of {WAVE} requests held {HOLD_S * 1e3:.0f} ms, medians of {args.rounds} rounds:")
    for name in kinds:
        c, w = statistics.median(cpu[name]), statistics.median(wall[name])
        print(
            f"  {name:<22} {c * 1e3:5.2f} ms CPU a request ({c / statistics.median(cpu[base]):4.1f}x),"
            f" a wave {w * 1e3:6.1f} ms ({(w - HOLD_S) * 1e3:5.1f} ms over the hold)"
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--waves", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        asyncio.run(measure(args))
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()

"""Event-loop lag while a burst of requests arrives at once (mock engine, real HTTP server).

Every run sends N streamed requests together, as the GPU benchmark does, while another process
GETs /health every 10 ms. Prints the probe's latency during the first 0.5 s of each run (the
arrivals: parsed, validated, tokenized, admitted) and over the rest (streaming), with the
arrival pacing on and off, side by side in one run.

    .venv/bin/python benchmarks/bench_burst_lag.py [--streams 64] [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import aiohttp
import uvloop

from _common import health_probe, pct, running_server, stream_chat

BURST_S = 0.5


async def burst(url: str, streams: int) -> None:
    body = {"messages": [{"role": "user", "content": "go"}], "stream": True}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=streams + 8)) as s:
        await asyncio.gather(*(stream_chat(s, url, body) for _ in range(streams)))


def measure(args: argparse.Namespace, pacing: int, tmp: Path) -> tuple[list[float], list[float]]:
    flags = [
        "--engine", "mock", "--mock-mode", "lorem", "--mock-lorem-tokens", str(args.tokens),
        "--mock-delay", str(args.delay), "--max-concurrent", str(args.streams),
        "--max-queue-size", str(args.streams), "--admit-per-tick", str(pacing),
        "--log-level", "warning",
    ]  # fmt: skip
    with running_server(*flags, tmp_path=tmp) as srv:
        uvloop.run(burst(srv.url, 8))  # warm up
        starts: list[float] = []
        with health_probe(srv.url, period_s=0.01) as lag:
            for _ in range(args.runs):
                starts.append(time.perf_counter())
                uvloop.run(burst(srv.url, args.streams))
    in_burst = [x for t, x in lag if any(s <= t < s + BURST_S for s in starts)]
    rest = [x for t, x in lag if not any(s <= t < s + BURST_S for s in starts)]
    return in_burst, rest


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--delay", type=float, default=0.005)
    ap.add_argument("--per-tick", type=int, default=2)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    print(f"{args.streams} streams at once, {args.runs} runs, {args.delay * 1e3:.0f} ms a step")
    for pacing in (0, args.per_tick):
        in_burst, rest = measure(args, pacing, tmp)
        label = f"{pacing} admitted per loop iteration" if pacing else "no pacing"
        print(
            f"{label:34s} /health during arrivals p50 {pct(in_burst, 50) * 1e3:.2f} p99 "
            f"{pct(in_burst, 99) * 1e3:.2f} max {max(in_burst) * 1e3:.2f} ms (n={len(in_burst)}); "
            f"after p99 {pct(rest, 99) * 1e3:.2f} ms (n={len(rest)})"
        )


if __name__ == "__main__":
    main()

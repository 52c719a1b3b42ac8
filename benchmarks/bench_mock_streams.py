"""Mock engine at 20 ms a step, 256 concurrent streams, through the real HTTP server.

Prints the gap between tokens each client sees ÷ the step time (p50, p99; target p99 <= 1.5),
event-loop lag from a /health probe every 50 ms in another process (target p99 <= 5 ms), and
for the record the most tokens/s the server delivers with no delay.

    .venv/bin/python benchmarks/bench_mock_streams.py [--streams 256] [--tokens 100]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import tempfile
import time
from pathlib import Path

import aiohttp
import uvloop

from _common import health_probe, lag_summary, pct, running_server, stream_chat, summary


async def run_streams(url: str, streams: int, tokens: int) -> tuple[list[list[float]], int, float]:
    body = {
        "messages": [{"role": "user", "content": "go"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    connector = aiohttp.TCPConnector(limit=streams + 8)
    async with aiohttp.ClientSession(connector=connector) as session:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(stream_chat(session, url, body) for _ in range(streams)))
        elapsed = time.perf_counter() - t0
    return [s for s, _ in results], sum(n for _, n in results), elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=100)
    ap.add_argument("--delay", type=float, default=0.02)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    common = [
        "--engine",
        "mock",
        "--mock-mode",
        "lorem",
        "--mock-lorem-tokens",
        str(args.tokens),
        "--max-concurrent",
        str(args.streams),
        "--max-queue-size",
        str(args.streams),
        "--log-level",
        "warning",
    ]

    with running_server(*common, "--mock-delay", str(args.delay), tmp_path=tmp) as srv:
        uvloop.run(run_streams(srv.url, 16, 10))  # warm up
        with health_probe(srv.url) as lag:
            start = time.perf_counter()
            stamps, total, elapsed = uvloop.run(run_streams(srv.url, args.streams, args.tokens))
    gaps = [b - a for s in stamps for a, b in itertools.pairwise(s)]
    ratio = [g / args.delay for g in gaps]
    print(f"streams={args.streams} tokens/stream={args.tokens} step={args.delay * 1e3:.0f}ms")
    print(f"inter-token gap: {summary(gaps)}")
    print(f"gap / step: p50={pct(ratio, 50):.3f} p99={pct(ratio, 99):.3f} (target p99 <= 1.5)")
    print(f"event-loop lag (/health every 50 ms): {lag_summary(lag, start)} (target p99 <= 5 ms)")
    print(f"delivered {total} tokens in {elapsed:.2f}s = {total / elapsed:.0f} tokens/s")

    with running_server(*common, "--mock-delay", "0", tmp_path=tmp) as srv:
        uvloop.run(run_streams(srv.url, 16, 10))
        _, total, elapsed = uvloop.run(run_streams(srv.url, args.streams, args.tokens))
    print(f"zero delay: {total} tokens in {elapsed:.2f}s = {total / elapsed:.0f} tokens/s")


if __name__ == "__main__":
    main()

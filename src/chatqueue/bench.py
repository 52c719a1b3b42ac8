"""`chatqueue bench`: load a running server with concurrent streamed chats and report what the
clients saw: throughput, time to first token, the gap between tokens, and refusals."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class Outcome:
    status: int = 0
    ttft_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)
    tokens: int = 0


@dataclass(frozen=True)
class BenchReport:
    requests: int
    ok: int
    refused: int  # 429
    failed: int
    elapsed_s: float
    tokens: int
    ttft_s: list[float]
    gaps_s: list[float]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.elapsed_s if self.elapsed_s else 0.0

    def lines(self) -> list[str]:
        return [
            f"requests {self.requests}: {self.ok} ok, {self.refused} refused (429), "
            f"{self.failed} failed, in {self.elapsed_s:.2f} s",
            f"output tokens {self.tokens}: {self.tokens_per_s:.1f} tokens/s",
            f"time to first token: {_dist(self.ttft_s)}",
            f"gap between tokens:  {_dist(self.gaps_s)}",
        ]


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def _dist(values: list[float]) -> str:
    if not values:
        return "n/a"
    return (
        f"p50 {_pct(values, 50) * 1e3:.1f} ms, p99 {_pct(values, 99) * 1e3:.1f} ms, "
        f"mean {statistics.fmean(values) * 1e3:.1f} ms"
    )


async def _one(client: httpx.AsyncClient, url: str, body: dict[str, object]) -> Outcome:
    out = Outcome()
    start = last = time.perf_counter()
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        out.status = r.status_code
        if r.status_code != 200:
            await r.aread()
            return out
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                out.status = 500
            elif chunk.get("usage"):
                out.tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                now = time.perf_counter()
                if out.ttft_s is None:
                    out.ttft_s = now - start
                else:
                    out.gaps_s.append(now - last)
                last = now
    return out


async def run_bench(
    *, url: str, requests: int, concurrency: int, prompt: str, max_tokens: int
) -> BenchReport:
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4)

    async def one(client: httpx.AsyncClient) -> Outcome:
        async with gate:
            return await _one(client, url, body)

    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        t0 = time.perf_counter()
        outcomes = await asyncio.gather(*(one(client) for _ in range(requests)))
        elapsed = time.perf_counter() - t0
    return BenchReport(
        requests=requests,
        ok=sum(o.status == 200 for o in outcomes),
        refused=sum(o.status == 429 for o in outcomes),
        failed=sum(o.status not in (200, 429) for o in outcomes),
        elapsed_s=elapsed,
        tokens=sum(o.tokens for o in outcomes),
        ttft_s=[o.ttft_s for o in outcomes if o.ttft_s is not None],
        gaps_s=[g for o in outcomes for g in o.gaps_s],
    )

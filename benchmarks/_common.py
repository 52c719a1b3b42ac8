"""Shared benchmark plumbing: a real server on a free port, SSE clients, a /health prober."""

from __future__ import annotations

import itertools
import json
import multiprocessing as mp
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support.servers import Server, running_server


def wait_healthy(
    url: str, proc: subprocess.Popen[bytes], *, period_s: float = 0.2, timeout_s: float = 300
) -> None:
    """Until `url`'s /health answers 200; raises if `proc` (its server) exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}): {proc.args}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url}/health not 200 after {timeout_s:.0f} s")
        time.sleep(period_s)


def from_each_process(
    url: str, method: str, path: str, processes: int, *, timeout_s: float = 120
) -> list[object]:
    """`method path` (a lag_recorder route) answered by each of the `processes` serving `url`
    (its API servers): asked on a new connection each time until every one has answered. An API
    server still starting (the first to answer /health is not the last up) is waited for."""
    answers: dict[int, object] = {}
    deadline = time.monotonic() + timeout_s
    for attempt in itertools.count():
        body = httpx.request(method, f"{url}{path}", timeout=30).json()
        answers.setdefault(body["pid"], body["data"])
        if len(answers) == processes:
            return list(answers.values())
        if time.monotonic() > deadline:
            break
        if attempt >= 16 * processes:  # not a matter of luck: one is not listening yet
            time.sleep(0.1)
    raise RuntimeError(f"{path}: only {len(answers)} of {processes} processes answered")


def api_servers_of(flags: list[str]) -> int:
    """How many API servers `chatqueue serve` flags ask for."""
    return int(flags[flags.index("--api-servers") + 1]) if "--api-servers" in flags else 1


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


async def stream_chat(
    session: aiohttp.ClientSession, url: str, body: dict[str, object]
) -> tuple[list[float], int]:
    """One streamed completion: the arrival time of each content chunk, and tokens received.
    aiohttp's C parser keeps the client's own cost per chunk small next to the server's."""
    stamps: list[float] = []
    tokens = 0
    async with session.post(f"{url}/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for raw in r.content:
            if not raw.startswith(b"data: {"):
                continue
            chunk = json.loads(raw[6:])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                stamps.append(time.perf_counter())
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return stamps, tokens


class StreamClients:
    """Streamed completions sent at once from `processes` client processes, each with its own
    event loop: one Python process reading 256 streams' chunks (an aiohttp read and a JSON parse
    each, tens of microseconds) falls behind a server that sends them faster, and its own delays
    then read as the server's inter-token gaps. Each process also times a 10 ms timer on its loop
    while its streams run: `client_lag` says whether the load generator kept up.
    perf_counter is CLOCK_MONOTONIC on Linux: one clock for every process."""

    def __init__(self, processes: int) -> None:
        ctx = mp.get_context("spawn")
        self._conns = []
        self._procs = []
        for _ in range(max(1, processes)):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_client_main, args=(child,), daemon=True)
            proc.start()
            self._conns.append(parent)
            self._procs.append(proc)
        for conn in self._conns:  # each has imported aiohttp and is ready
            conn.recv()

    def run(
        self, url: str, bodies: list[dict[str, object]]
    ) -> tuple[float, float, list[tuple[list[float], int]], list[float]]:
        """Every body streamed at once (spread round-robin over the processes, all starting at
        one instant). Returns that instant, when the last stream ended, each body's (chunk
        arrival times, tokens) in order, and the client loops' timer lags."""
        start = time.perf_counter() + 0.2
        k = len(self._conns)
        for i, conn in enumerate(self._conns):
            conn.send((url, bodies[i::k], start))
        results: list[tuple[list[float], int]] = [([], 0)] * len(bodies)
        lags: list[float] = []
        end = start
        for i, conn in enumerate(self._conns):
            part, part_lags, part_end = conn.recv()
            results[i::k] = part
            lags += part_lags
            end = max(end, part_end)
        return start, end, results, lags

    def close(self) -> None:
        for conn in self._conns:
            conn.send(None)
        for proc in self._procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()

    def __enter__(self) -> StreamClients:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _client_main(conn) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    conn.send("ready")
    while (job := conn.recv()) is not None:
        url, bodies, start = job
        conn.send(asyncio.run(_client_run(url, bodies, start)))


async def _client_run(
    url: str, bodies: list[dict[str, object]], start: float
) -> tuple[list[tuple[list[float], int]], list[float], float]:
    import asyncio

    lags: list[float] = []
    done = False

    async def timer() -> None:
        while not done:
            t = time.perf_counter()
            await asyncio.sleep(0.01)
            lags.append(time.perf_counter() - t - 0.01)

    connector = aiohttp.TCPConnector(limit=len(bodies) + 4)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.sleep(max(0.0, start - time.perf_counter()))
        ticking = asyncio.create_task(timer())
        results = await asyncio.gather(*(stream_chat(session, url, b) for b in bodies))
        end = time.perf_counter()
        done = True
        await ticking
    return list(results), lags, end


def _probe(url: str, period_s: float, stop: object, out: object, ready: object) -> None:
    latencies: list[tuple[float, float]] = []  # (when, how long)
    ready.set()  # type: ignore[attr-defined]
    with httpx.Client(timeout=10) as client:
        while not stop.is_set():  # type: ignore[attr-defined]
            t0 = time.perf_counter()
            client.get(f"{url}/health")
            latencies.append((t0, time.perf_counter() - t0))
            time.sleep(max(0.0, period_s - (time.perf_counter() - t0)))
    out.put(latencies)  # type: ignore[attr-defined]


@contextmanager
def health_probe(url: str, period_s: float = 0.05) -> Iterator[list[tuple[float, float]]]:
    """A separate process GETs /health every `period_s`; yields the list of (perf_counter at the
    probe's start, latency) filled on exit."""
    ctx = mp.get_context("spawn")
    stop, out, ready = ctx.Event(), ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_probe, args=(url, period_s, stop, out, ready), daemon=True)
    proc.start()
    ready.wait(120)  # a spawned child re-imports the parent's main module first: can be slow
    result: list[tuple[float, float]] = []
    try:
        yield result
    finally:
        stop.set()
        result.extend(out.get(timeout=30))
        proc.join(10)


def lag_summary(probes: list[tuple[float, float]], start: float, skip_s: float = 2.0) -> str:
    """Probe latencies over the whole run, and from `skip_s` after `start` on (the burst of
    arrivals at the start parses, validates and tokenizes every request on the event loop)."""
    whole = [lat for _, lat in probes]
    steady = [lat for t, lat in probes if t >= start + skip_s]
    return f"whole run {summary(whole)}; from {skip_s:.0f} s on {summary(steady)}"


def summary(values: list[float]) -> str:
    return (
        f"p50={pct(values, 50) * 1e3:.2f}ms p99={pct(values, 99) * 1e3:.2f}ms "
        f"mean={statistics.fmean(values) * 1e3:.2f}ms n={len(values)}"
    )


__all__ = [
    "Server",
    "StreamClients",
    "health_probe",
    "lag_summary",
    "pct",
    "running_server",
    "stream_chat",
    "summary",
]


def load_in_process(model: str | None = None):  # type: ignore[no-untyped-def]
    """The default model (or `model`), fp32 on the CPU, tokenizer and model in this process: what
    `chatqueue serve --model-process off` runs. Returns a TokenizedRunner."""
    from chatqueue.api.build import load_hf
    from chatqueue.config import Settings

    settings = Settings(
        engine="hf", model=model, device="cpu", dtype="float32", model_process="off"
    )
    return load_hf(settings)

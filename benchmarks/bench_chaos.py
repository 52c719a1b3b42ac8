"""Chaos: under steady load, SIGKILL the model process again and again, at random moments.

A real `chatqueue serve` on the default model (the model in its own process), a fixed number of
clients each sending streamed chats one after another, and the model process killed `--kills`
times, each at a random moment once the server is back. Prints:
  - requests completed; ended with a clear error (an error event, or a JSON error with a status);
    lost (the connection ended with neither: must be 0); hung (no end within the safety time:
    must be 0);
  - seconds from each kill to /health ok again (p50, max);
  - the requests that were waiting in the queue at a kill: how many that kill failed (must be
    0), how many took a slot once the model was back, and whether their positions only fell.
Clients honour Retry-After on a refusal (a 503 while the model restarts), as clients should.

    .venv/bin/python benchmarks/bench_chaos.py [--kills 20] [--clients 10] [--max-concurrent 4]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import signal
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from _common import running_server
from tests.support.servers import model_process

HUNG_S = 120.0  # a request with no end after this long counts as hung


@dataclass
class Request:
    started: float
    positions: list[int] = field(default_factory=list)
    admitted: float | None = None  # its first chunk (the assistant's role): it took a slot
    first_content: float | None = None
    ended: float | None = None
    outcome: str = "running"  # completed | error | refused | lost | hung
    error: str = ""
    retry_after_s: float = 0.0


async def one_chat(client: httpx.AsyncClient, number: int, requests: list[Request]) -> None:
    req = Request(time.perf_counter())
    requests.append(req)
    body = {
        "messages": [{"role": "user", "content": f"Say something about the number {number}."}],
        "stream": True,
        "max_tokens": 24,
        "temperature": 0,
    }
    try:
        async with asyncio.timeout(HUNG_S):
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    body = json.loads(await r.aread())
                    req.outcome, req.error = "refused", body["error"]["type"]
                    req.retry_after_s = float(r.headers.get("Retry-After", 0))
                    return
                async for line in r.aiter_lines():
                    if line.startswith(": queued position="):
                        req.positions.append(int(line.split("=")[1].split()[0]))
                    elif line.startswith("data: {"):
                        chunk = json.loads(line[6:])
                        if req.admitted is None:
                            req.admitted = time.perf_counter()
                        if "error" in chunk:
                            req.outcome, req.error = "error", chunk["error"]["type"]
                        elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                            req.first_content = req.first_content or time.perf_counter()
                        elif chunk["choices"] and chunk["choices"][0]["finish_reason"]:
                            req.outcome = "completed"
                    elif line == "data: [DONE]" and req.outcome == "running":
                        req.outcome = "lost"  # [DONE] with neither a finish nor an error
        if req.outcome == "running":
            req.outcome = "lost"
    except TimeoutError:
        req.outcome = "hung"
    except httpx.HTTPError as exc:
        req.outcome, req.error = "lost", type(exc).__name__
    finally:
        req.ended = time.perf_counter()


async def client_loop(url: str, stop: asyncio.Event, requests: list[Request], base: int) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(30, read=None)) as client:
        n = 0
        while not stop.is_set():
            await one_chat(client, base + n, requests)
            await asyncio.sleep(min(10.0, requests[-1].retry_after_s))  # as clients should
            n += 1


async def wait_health(client: httpx.AsyncClient, status: str) -> None:
    while True:
        try:
            if (await client.get("/health")).json()["status"] == status:
                return
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.02)


async def chaos(url: str, server_pid: int, args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    requests: list[Request] = []
    stop = asyncio.Event()
    clients = [
        asyncio.create_task(client_loop(url, stop, requests, 1000 * i)) for i in range(args.clients)
    ]
    recoveries: list[float] = []
    at_kills: list[tuple[float, float, list[Request]]] = []  # killed, back, who waited then
    async with httpx.AsyncClient(base_url=url, timeout=10) as probe:
        await asyncio.sleep(3.0)  # load is steady
        for k in range(args.kills):
            await asyncio.sleep(rng.uniform(2.0, 6.0))
            pid = model_process(server_pid)
            waiting = [r for r in requests if r.ended is None and r.admitted is None]
            os.kill(pid, signal.SIGKILL)
            killed = time.perf_counter()
            await wait_health(probe, "restarting")  # noticed within a step, or a second idle
            await wait_health(probe, "ok")
            back = time.perf_counter()
            recoveries.append(back - killed)
            at_kills.append((killed, back, [r for r in waiting if r.positions]))
            print(f"kill {k + 1}: back in {recoveries[-1]:.2f} s", flush=True)
        stop.set()
        await asyncio.gather(*clients)
    report(requests, recoveries, at_kills)


def report(
    requests: list[Request],
    recoveries: list[float],
    at_kills: list[tuple[float, float, list[Request]]],
) -> None:
    outcomes = ("completed", "error", "refused", "lost", "hung")
    counts = {o: sum(r.outcome == o for r in requests) for o in outcomes}
    errors: dict[str, int] = {}
    for r in requests:
        if r.outcome in ("error", "refused"):
            errors[f"{r.outcome}: {r.error}"] = errors.get(f"{r.outcome}: {r.error}", 0) + 1
    print(f"requests {len(requests)}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print(f"errors by type: {errors}")
    ordered = sorted(recoveries)
    print(
        f"kill -> ready: p50 {statistics.median(ordered):.2f} s, max {ordered[-1]:.2f} s "
        f"over {len(ordered)} kills"
    )
    # NOTE: a waiting request takes a slot only once the model is back; its first chunk may
    # reach this client a moment before /health's ok does, so "after the kill" is the test.
    waiting = sum(len(batch) for _, _, batch in at_kills)
    failed = sum(
        r.ended is not None and r.ended < back and r.outcome != "completed"
        for _, back, batch in at_kills
        for r in batch
    )
    started = sum(
        r.admitted is not None and r.admitted >= killed
        for killed, _, batch in at_kills
        for r in batch
    )
    in_order = all(_in_order(batch) for _, _, batch in at_kills)
    print(
        f"waiting at a kill: {waiting}; failed by that kill: {failed}; started once the model "
        f"was back: {started}; positions only ever fell: {'yes' if in_order else 'no'}"
    )


def _in_order(batch: list[Request]) -> bool:
    """Nobody overtook a request that waited through a kill: the positions it was told never
    rose, before the kill and after it."""
    return all(
        later <= earlier for r in batch for earlier, later in itertools.pairwise(r.positions)
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--max-concurrent", type=int, default=4)
    ap.add_argument("--seed", type=int, default=12)
    args = ap.parse_args()
    flags = (
        "--max-concurrent", str(args.max_concurrent), "--max-queue-size", "32",
        "--model-restarts", str(args.kills + 5), "--log-level", "warning",
    )  # fmt: skip
    with (
        tempfile.TemporaryDirectory() as tmp,
        running_server(*flags, tmp_path=Path(tmp), ready_timeout_s=600) as server,
    ):
        asyncio.run(chaos(server.url, server.process.pid, args))
        lines = [ln for ln in server.log().splitlines() if "Traceback" in ln]
        print(f"tracebacks in the server log: {len(lines)}")


if __name__ == "__main__":
    main()

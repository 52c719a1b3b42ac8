"""Soak: mixed traffic on the mock engine for minutes; does the server hold its memory, its file
descriptors and its tasks?

Clients stream, wait for plain replies, walk away mid-stream or mid-wait, and get 429s (more of
them at once than the server takes). At the end it prints the requests by outcome, the server's
RSS after the warm-up against at the end (target: growth under 5%), and its open fds and asyncio
tasks (from /load's admin-only debug figures) before and after.

    .venv/bin/python benchmarks/bench_soak.py --minutes 20
"""

from __future__ import annotations

import argparse
import asyncio
import random
import secrets
import sys
import time
from collections import Counter
from pathlib import Path
from tempfile import TemporaryDirectory

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from chatqueue.engine.mock import LOREM
from tests.support.servers import Server, running_server

KINDS = ("stream", "plain", "leave_stream", "leave_plain")
WEIGHTS = (45, 30, 15, 10)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def num_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


class Soak:
    def __init__(self, server: Server, admin_key: str, seed: int) -> None:
        self.url = server.url
        self.admin = {"Authorization": f"Bearer {admin_key}"}
        self.rng = random.Random(seed)
        self.outcomes: Counter[str] = Counter()
        self.stop_at = 0.0

    async def client(self, session: aiohttp.ClientSession) -> None:
        while time.monotonic() < self.stop_at:
            kind = self.rng.choices(KINDS, WEIGHTS)[0]
            # NOTE: words from a fixed list: the mock tokenizer learns every new word for good,
            # which would read as a leak in the server.
            text = " ".join(self.rng.choices(LOREM, k=self.rng.randint(2, 30)))
            try:
                outcome = await self.one(session, kind, text)
            except (aiohttp.ClientError, TimeoutError) as exc:
                outcome = f"client error ({type(exc).__name__})"
            self.outcomes[outcome] += 1
            if outcome == "429":
                await asyncio.sleep(self.rng.uniform(0.05, 0.2))

    async def one(self, session: aiohttp.ClientSession, kind: str, text: str) -> str:
        body = {"messages": [{"role": "user", "content": text}], "stream": "stream" in kind}
        url = f"{self.url}/v1/chat/completions"
        if kind == "leave_plain":
            try:
                async with asyncio.timeout(self.rng.uniform(0.005, 0.3)):
                    async with session.post(url, json=body) as r:
                        await r.read()
                        return _status(r.status, "plain completed (before leaving)")
            except TimeoutError:
                return "plain left"
        async with session.post(url, json=body) as r:
            if r.status != 200:
                await r.read()
                return _status(r.status, "")
            if kind == "plain":
                reply = (await r.json())["choices"][0]["message"]["content"]
                return "plain completed" if reply == text else "plain WRONG TEXT"
            leave_after = self.rng.randint(0, 10) if kind == "leave_stream" else None
            seen = 0
            async for line in r.content:
                if line.startswith(b"data: [DONE]"):
                    return "stream completed"
                if line.startswith(b"data: {") and b'"error"' in line:
                    return "stream error chunk"
                seen += line.startswith(b"data: ")
                if leave_after is not None and seen > leave_after:
                    r.close()
                    return "stream left"
            return "stream cut short"

    async def figures(self, session: aiohttp.ClientSession) -> dict[str, object]:
        async with session.get(f"{self.url}/load", headers=self.admin) as r:
            return dict(await r.json())

    async def wait_idle(self, session: aiohttp.ClientSession) -> dict[str, object]:
        while True:
            load = await self.figures(session)
            if load["processing"] == 0 and load["waiting"] == 0:
                return load
            await asyncio.sleep(0.1)


def _status(status: int, ok: str) -> str:
    return ok if status == 200 else str(status)


async def soak(args: argparse.Namespace, server: Server, admin_key: str) -> bool:
    pid = server.process.pid
    s = Soak(server, admin_key, args.seed)
    duration_s = args.minutes * 60
    warmup_s = min(args.warmup_s, duration_s / 4)
    start = time.monotonic()
    s.stop_at = start + duration_s
    connector = aiohttp.TCPConnector(limit=args.clients + 4)
    async with aiohttp.ClientSession(connector=connector) as session:
        base = await s.figures(session)
        clients = [asyncio.create_task(s.client(session)) for _ in range(args.clients)]
        await asyncio.sleep(warmup_s)
        rss_warm, fds_warm = rss_mb(pid), num_fds(pid)
        print(f"after {warmup_s:.0f} s warm-up: RSS {rss_warm:.1f} MB, {fds_warm} fds", flush=True)
        while time.monotonic() < s.stop_at:
            await asyncio.sleep(min(60.0, max(0.0, s.stop_at - time.monotonic())))
            served = sum(s.outcomes.values())
            print(
                f"  {time.monotonic() - start:6.0f} s: {served} requests, "
                f"RSS {rss_mb(pid):.1f} MB, {num_fds(pid)} fds",
                flush=True,
            )
        await asyncio.gather(*clients)
        await s.wait_idle(session)
    await asyncio.sleep(1.0)  # let the server close the clients' connections
    async with aiohttp.ClientSession() as session:
        end = await s.figures(session)
    rss_end, fds_end = rss_mb(pid), num_fds(pid)
    growth = (rss_end - rss_warm) / rss_warm * 100

    total = sum(s.outcomes.values())
    print(f"\n{total} requests in {args.minutes:g} min ({total / duration_s:.0f}/s), by outcome:")
    for outcome, n in sorted(s.outcomes.items(), key=lambda kv: -kv[1]):
        print(f"  {outcome:34s} {n:8d}  {n / total:6.1%}")
    print(f"RSS: {rss_warm:.1f} MB after warm-up, {rss_end:.1f} MB at the end: {growth:+.2f}%")
    print(f"open fds: {fds_warm} after warm-up, {fds_end} at the end")
    print(f"server /load debug: before {base.get('debug')}, at the end {end.get('debug')}")
    ok = (
        growth < 5.0
        and not any("WRONG" in k or "cut short" in k or k.startswith("5") for k in s.outcomes)
        and end["processing"] == 0
        and end["waiting"] == 0
    )
    print(f"target (RSS growth < 5%, no 5xx, no wrong or cut text, idle at the end): {ok}")
    return ok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=20.0)
    p.add_argument("--warmup-s", type=float, default=60.0, help="at most a quarter of the run")
    p.add_argument("--clients", type=int, default=48, help="concurrent clients")
    p.add_argument("--max-concurrent", type=int, default=8)
    p.add_argument("--max-queue-size", type=int, default=32, help="below --clients: some get 429s")
    p.add_argument("--mock-delay", type=float, default=0.005)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    admin_key = secrets.token_urlsafe(16)
    flags = (
        "--engine", "mock", "--mock-delay", str(args.mock_delay),
        "--max-concurrent", str(args.max_concurrent), "--max-queue-size", str(args.max_queue),
        "--admin-key", admin_key, "--log-level", "warning", "--history", "memory",
    )  # fmt: skip
    with TemporaryDirectory() as tmp, running_server(*flags, tmp_path=Path(tmp)) as server:
        ok = asyncio.run(soak(args, server, admin_key))
        if "Traceback" in server.log():
            print("the server logged a traceback:\n" + server.log()[-4000:])
            ok = False
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

"""The front end at many streams arriving together: front_model.py's server (a fake model that takes
a fixed time a step, in its own process, behind SmolLM2's real tokenizer and chat template), N
streamed chat completions of ~256-token prompts and M new tokens each, sent at once, R runs.

Prints, for each server variant (its flags, and the checkout its code comes from), side by side in
one run, every variant's server up at once and the runs alternating between them:
  - the event loop's lag (a 10 ms timer on the server's loop, every sample kept): p99 during the
    first 0.5 s of each run (the arrivals) and after (streaming);
  - the gap between a stream's content chunks, p50/p99, and p99 ÷ the step;
  - tokens/s through HTTP ÷ the same requests in-process (the variant's ChatQueue over the same
    fake model in its own process, no HTTP);
and the ratios of each variant's figures to the first's.

    .venv/bin/python benchmarks/bench_front_lag.py [--streams 256] [--tokens 256] [--step-ms 3]
        [--variant 'main@/work/main/src:' --variant 'new:' --variant 'nopace:--admit-per-tick 0']
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import uvloop

from _common import api_servers_of, from_each_process, pct, stream_chat, wait_healthy
from tests.support.servers import api_server_pids, free_port

BURST_S = 0.5
HERE = Path(__file__).resolve().parent
WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "his",
    "her",
    "an",
    "it",
    "this",
    "be",
    "are",
    "or",
    "had",
    "not",
    "but",
    "were",
    "which",
    "have",
    "one",
    "all",
    "their",
    "they",
    "has",
    "been",
    "there",
    "when",
    "who",
    "more",
    "time",
    "people",
]


def prompt(i: int, num_words: int = 240) -> str:
    """~256 tokens once templated (SmolLM2), different for every request."""
    rng = random.Random(i)
    return f"request {i}: " + " ".join(rng.choice(WORDS) for _ in range(num_words))


@dataclass
class Figures:
    lag_arrivals: list[float] = field(default_factory=list)
    lag_after: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    gaps_after: list[float] = field(default_factory=list)  # those ending after the arrivals
    tokens_per_s: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    # server (with its API servers), client, wall, the server's own process alone (the core), s
    cpu: list[tuple[float, float, float, float]] = field(default_factory=list)
    gc_pauses: list[float] = field(default_factory=list)  # the server's, during the runs, s


@dataclass
class Variant:
    """A server to measure: `label[@SRC]:FLAGS`, chatqueue imported from SRC (another checkout's
    `src`, so an old and a new code path run side by side) or from wherever this run imports it."""

    label: str
    flags: list[str]
    src: str | None = None
    url: str = ""
    pid: int = 0
    in_process: float = float("nan")
    figures: Figures = field(default_factory=Figures)

    @classmethod
    def parse(cls, text: str) -> Variant:
        name, _, flags = text.partition(":")
        label, _, src = name.partition("@")
        return cls(label, flags.split(), src or None)

    @property
    def env(self) -> dict[str, str]:
        if self.src is None:
            return dict(os.environ)
        return {**os.environ, "PYTHONPATH": os.pathsep.join([self.src, str(HERE.parent)])}


@contextmanager
def server(args: argparse.Namespace, v: Variant) -> Iterator[tuple[str, int]]:
    port = free_port()
    cmd = [
        sys.executable, str(HERE / "front_model.py"), "--port", str(port),
        "--max-concurrent", str(args.streams), "--step-ms", str(args.step_ms),
        "--tokenizer", args.tokenizer, *v.flags,
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, env={**v.env, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, timeout_s=120)
        yield url, proc.pid
    finally:
        proc.terminate()
        proc.wait(30)


async def burst(url: str, args: argparse.Namespace, seed: int) -> tuple[float, Figures]:
    def body(i: int) -> dict[str, object]:
        return {
            "messages": [{"role": "user", "content": prompt(seed + i)}],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": args.tokens,
            "temperature": 0,
            "ignore_eos": True,
        }

    connector = aiohttp.TCPConnector(limit=args.streams + 8)
    async with aiohttp.ClientSession(connector=connector) as s:
        t0 = time.perf_counter()
        res = await asyncio.gather(*(stream_chat(s, url, body(i)) for i in range(args.streams)))
        elapsed = time.perf_counter() - t0
    f = Figures()
    f.gaps = [b - a for st, _ in res for a, b in itertools.pairwise(st)]
    f.gaps_after = [b - a for st, _ in res for a, b in itertools.pairwise(st) if b >= t0 + BURST_S]
    f.ttft = [st[0] - t0 for st, _ in res if st]
    f.tokens_per_s = [sum(n for _, n in res) / elapsed]
    return t0, f


def cpu_s(pid: int | None = None) -> float:
    """CPU seconds (user + system) of a process so far: this one (and its threads), or `pid`."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_cpu_s(pid: int) -> float:
    """CPU seconds of a server: its process and its API servers (not its model process)."""
    return cpu_s(pid) + sum(cpu_s(p) for p in api_server_pids(pid))


def run_variant(v: Variant, args: argparse.Namespace, run: int) -> None:
    processes = api_servers_of(v.flags)
    from_each_process(v.url, "POST", "/bench/lag", processes)
    server0, client0, wall0, own0 = server_cpu_s(v.pid), cpu_s(), time.perf_counter(), cpu_s(v.pid)
    start, f = uvloop.run(burst(v.url, args, seed=1000 * (run + 1)))
    wall = time.perf_counter() - wall0
    server, own = server_cpu_s(v.pid) - server0, cpu_s(v.pid) - own0
    v.figures.cpu.append((server, cpu_s() - client0, wall, own))
    # NOTE: under --api-servers, every API server's loop: each carries its share of the streams
    recorded = from_each_process(v.url, "GET", "/bench/lag", processes)
    samples = [x for each in recorded for x in each]  # type: ignore[attr-defined]
    pauses = from_each_process(v.url, "GET", "/bench/gc", processes)
    v.figures.gc_pauses += [s for each in pauses for _, _, s in each]  # type: ignore[attr-defined]
    v.figures.lag_arrivals += [lag for t, lag in samples if start <= t < start + BURST_S]
    v.figures.lag_after += [lag for t, lag in samples if t >= start + BURST_S]
    v.figures.gaps += f.gaps
    v.figures.gaps_after += f.gaps_after
    v.figures.ttft += f.ttft
    v.figures.tokens_per_s += f.tokens_per_s


async def in_process(args: argparse.Namespace) -> float:
    """The same requests through ChatQueue in this process (no HTTP): tokens/s."""
    sys.path.insert(0, str(HERE))
    import front_model
    from chatqueue import ChatQueue
    from chatqueue.engine.process.runner import ProcessRunner
    from chatqueue.types import ChatMessage, SamplingParams

    tokenizer = (
        front_model.real_tokenizer() if args.tokenizer == "real" else front_model.StandInTokenizer()
    )
    load = functools.partial(front_model.fake_model, args.step_ms / 1e3, front_model.reply_ids())
    runner = functools.partial(
        ProcessRunner, load, tokenizer=tokenizer, model_name=front_model.MODEL_NAME
    )
    cq = ChatQueue(runner, max_concurrent=args.streams, max_queue_size=args.streams)
    await cq.start_queue_worker()
    await cq.wait_ready(120)
    params = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)
    rates = []
    for run in range(args.runs):
        msgs = [[ChatMessage("user", prompt(run * 1000 + i))] for i in range(args.streams)]
        t0 = time.perf_counter()
        streams = await asyncio.gather(*(cq.submit(m, params) for m in msgs))
        done = await asyncio.gather(*(s.collect() for s in streams))
        rates.append(sum(d.usage.completion_tokens for d in done) / (time.perf_counter() - t0))
    await cq.stop()
    return statistics.median(rates)


def in_process_of(v: Variant, args: argparse.Namespace) -> float:
    """The variant's code in-process (its own process: a variant may import another checkout)."""
    cmd = [
        sys.executable, __file__, "--in-process-only", "--streams", str(args.streams),
        "--tokens", str(args.tokens), "--step-ms", str(args.step_ms), "--runs", str(args.runs),
        "--tokenizer", args.tokenizer,
    ]  # fmt: skip
    out = subprocess.run(cmd, env=v.env, check=True, capture_output=True, text=True).stdout
    return float(out.split()[-1])


def report(v: Variant, base: Variant, step_s: float) -> None:
    f, b = v.figures, base.figures
    tps = statistics.median(f.tokens_per_s)
    inproc = v.in_process

    def ratio(mine: float, theirs: float) -> str:
        return "" if v is base else f" ({mine / theirs:.2f}x {base.label})"

    lag_a, lag_s = pct(f.lag_arrivals, 99) * 1e3, pct(f.lag_after, 99) * 1e3
    gap99 = pct(f.gaps, 99)
    print(
        f"[{v.label}] {v.src or 'this checkout'}: {' '.join(v.flags) or '(defaults)'}\n"
        f"  loop lag p99 arrivals {lag_a:.2f} ms{ratio(lag_a, pct(b.lag_arrivals, 99) * 1e3)}"
        f" (n={len(f.lag_arrivals)}), after {lag_s:.2f} ms"
        f"{ratio(lag_s, pct(b.lag_after, 99) * 1e3)} (n={len(f.lag_after)}); max "
        f"{max(f.lag_arrivals + f.lag_after) * 1e3:.1f} ms  (goal p99 <= 5 ms)\n"
        f"  chunk gap p50 {pct(f.gaps, 50) * 1e3:.2f} ms p99 {gap99 * 1e3:.2f} ms = "
        f"{gap99 / step_s:.1f} steps{ratio(gap99, pct(b.gaps, 99))}  (goal p99 <= 4 steps); "
        f"after the arrivals p99 {pct(f.gaps_after, 99) / step_s:.1f} steps; "
        f"TTFT p50 {pct(f.ttft, 50) * 1e3:.0f} ms p99 {pct(f.ttft, 99) * 1e3:.0f} ms\n"
        f"  tokens/s {tps:.0f} (runs {[round(x) for x in f.tokens_per_s]}) ÷ in-process "
        f"{inproc:.0f} = {tps / inproc:.3f}; HTTP tokens/s"
        f"{ratio(tps, statistics.median(b.tokens_per_s)) or ' (base)'}"
        "  (goal >= 0.95)\n"
        f"  CPU a run: server {statistics.fmean(c[0] for c in f.cpu):.2f} s (its API servers "
        f"counted, its model process not; its own process {statistics.fmean(c[3] for c in f.cpu):.2f} s), clients {statistics.fmean(c[1] for c in f.cpu):.2f} s, in "
        f"{statistics.fmean(c[2] for c in f.cpu):.2f} s on {os.cpu_count()} CPUs\n"
        f"  the server's garbage collections a run: {len(f.gc_pauses) / len(f.cpu):.0f}, over "
        f"2 ms {sum(p > 0.002 for p in f.gc_pauses) / len(f.cpu):.1f}, longest "
        f"{max(f.gc_pauses, default=0) * 1e3:.1f} ms, in all {sum(f.gc_pauses) * 1e3:.0f} ms"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--step-ms", type=float, default=3.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokenizer", choices=["real", "stand-in"], default="real")
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        help="LABEL[@SRC]:FLAGS: chatqueue from SRC (default: as this run imports it), the "
        "server's flags (front_model.py's and `chatqueue serve`'s)",
    )
    ap.add_argument("--in-process-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.in_process_only:  # a variant's code, in a process of its own
        print(uvloop.run(in_process(args)))
        return
    variants = [Variant.parse(s) for s in args.variant or ["default:"]]
    print(
        f"{args.streams} streams at once, {args.tokens} new tokens, {args.step_ms} ms a step, "
        f"{args.tokenizer} tokenizer, {args.runs} runs each; load average {os.getloadavg()}"
    )
    for v in variants:
        v.in_process = in_process_of(v, args)
    with ExitStack() as stack:
        for v in variants:
            v.url, v.pid = stack.enter_context(server(args, v))
            uvloop.run(burst(v.url, argparse.Namespace(**{**vars(args), "tokens": 8}), 0))
        for run in range(args.runs):  # alternating: the machine's noise falls on every variant
            for v in variants:
                run_variant(v, args, run)
    for v in variants:
        report(v, variants[0], args.step_ms / 1e3)


if __name__ == "__main__":
    main()

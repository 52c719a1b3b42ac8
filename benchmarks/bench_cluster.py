"""The cluster path (chatqueue.cluster on Ray Serve) against the plain server, side by side.

CPU (default): one mock replica behind the cluster's endpoint (Serve's proxy, the front, the
request router, the replica) ÷ the plain server (`chatqueue serve`, the same mock engine and
caps), at the same load: tokens/s (goal >= 0.9) and the time to first token added (p50, goal
<= 10 ms). Both servers stay up; rounds alternate between them. Each round also prints the CPU
time the server's processes took per token (the cluster's: its Ray processes too) and the load
average: on a shared machine tokens/s follow the load, CPU per token much less.

    .venv/bin/python benchmarks/bench_cluster.py [--streams 32] [--rounds 3] [--cluster-args "..."]

(`--cluster-args "--cluster-link off"`: the front places its waves by Serve calls, as before its
own lines to the replicas; run it as a second invocation: one local Ray a run.)

GPU (`--gpu`, two GPUs: device kind nvidia-h200-x2): two replicas ÷ one replica of the real
model at 2x64 streams: tokens/s (goal >= 1.9x), time to first token, and the front's
event-loop lag (chatqueue_event_loop_lag_seconds, as in the issue-6 benchmark).

    python benchmarks/bench_cluster.py --gpu [--model DIR] [--streams 128] [--max-tokens 256]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from chatqueue.bench import BenchReport, run_bench
from tests.support.http import metric
from tests.support.servers import Server, running_server

PROMPT = "Tell me about Tokyo."


def wait_replicas(server: Server, num: int, timeout_s: float = 600) -> None:
    """Until /load lists `num` ready replicas (the cluster's /health is ok with one)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rows = httpx.get(f"{server.url}/load", timeout=10).json().get("replicas", [])
        if sum(1 for r in rows if r.get("state") == "ready") == num:
            return
        time.sleep(0.5)
    raise TimeoutError(f"{num} replicas not ready after {timeout_s} s")


def bench(url: str, *, streams: int, requests: int, max_tokens: int) -> BenchReport:
    return asyncio.run(
        run_bench(
            url=url, requests=requests, concurrency=streams, prompt=PROMPT, max_tokens=max_tokens
        )
    )


def cpu_s(root: int) -> float:
    """CPU seconds (user + system) of `root` and every process under it, as they are now."""
    children: dict[int, list[int]] = {}
    times: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        children.setdefault(int(fields[1]), []).append(int(entry.name))
        times[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += times.get(pid, 0.0)
        todo += children.get(pid, [])
    return total


def probe(servers: dict[str, Server], num: int) -> dict[str, float]:
    """TTFT p50 of `num` requests one at a time on each server, alternating: the latency a
    request's path adds when the server has nothing else to do."""
    ttfts: dict[str, list[float]] = {name: [] for name in servers}
    for _ in range(num):
        for name, server in servers.items():
            report = bench(server.url, streams=1, requests=1, max_tokens=2)
            ttfts[name] += report.ttft_s
    return {name: p50(values) for name, values in ttfts.items()}


def cpu_per_request(root: int, url: str, streams: int, num: int = 200) -> float:
    """CPU seconds a short request (one token) costs a server's processes, `streams` at once:
    what the start of a request costs, apart from its tokens."""
    before = cpu_s(root)
    bench(url, streams=streams, requests=num, max_tokens=1)
    return (cpu_s(root) - before) / num


def idle_cores(root: int, seconds: float = 5.0) -> float:
    """What a server's processes use while it serves nothing (Ray's own loops, for a cluster):
    CPU seconds a second."""
    before = cpu_s(root)
    time.sleep(seconds)
    return (cpu_s(root) - before) / seconds


def p50(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def loop_lag_p99_ms(url: str) -> float:
    """The front's event-loop lag, p99 from its histogram (upper bound of the bucket)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    name = "chatqueue_event_loop_lag_seconds_bucket"
    total = metric(text, "chatqueue_event_loop_lag_seconds_count")
    for le in ("0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1.0"):
        if total and metric(text, name, le=le) >= 0.99 * total:
            return float(le) * 1e3
    return float("nan")


def cpu(args: argparse.Namespace) -> None:
    common = [
        "--engine", "mock", "--mock-mode", "lorem", "--mock-lorem-tokens", str(args.max_tokens),
        "--mock-delay", "0.02", "--max-concurrent", str(args.streams),
        "--max-queue-size", str(args.streams * 4), "--history", "memory",
    ]  # fmt: skip
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        plain = stack.enter_context(running_server(*common, tmp_path=tmp))
        cluster_flags = ["--replicas", "1", "--replica-cpus", "0.1", *args.cluster_args.split()]
        cluster = stack.enter_context(
            running_server(*common, *cluster_flags, tmp_path=tmp, ready_timeout_s=600)
        )
        # NOTE: a cluster server is stopped with SIGTERM, so that it stops the Ray it started.
        stack.callback(cluster.terminate, 120)
        wait_replicas(cluster, 1)
        servers = {"plain": plain, "cluster": cluster}
        for server in servers.values():  # warm both paths up
            bench(server.url, streams=args.streams, requests=args.streams, max_tokens=8)
        idle = {name: idle_cores(server.process.pid) for name, server in servers.items()}
        print("CPU while idle (cores): " + ", ".join(f"{n} {c:.3f}" for n, c in idle.items()))
        reports: dict[str, list[BenchReport]] = {name: [] for name in servers}
        cpu_ms: dict[str, list[float]] = {name: [] for name in servers}
        for r in range(args.rounds):
            for name, server in servers.items():
                before = cpu_s(server.process.pid)
                report = bench(
                    server.url,
                    streams=args.streams,
                    requests=args.streams * 4,
                    max_tokens=args.max_tokens,
                )
                used = cpu_s(server.process.pid) - before
                tokens = report.tokens
                reports[name].append(report)
                cpu_ms[name].append(used / tokens * 1e3 if tokens else float("nan"))
                print(
                    f"round {r + 1} {name:7s}: {report.tokens_per_s:8.1f} tokens/s, "
                    f"TTFT p50 {p50(report.ttft_s) * 1e3:6.1f} ms, ok {report.ok}/{report.requests}, "
                    f"{cpu_ms[name][-1]:.3f} CPU ms/token, load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
        alone = probe(servers, args.probes)
        per_request = {
            name: cpu_per_request(server.process.pid, server.url, args.streams)
            for name, server in servers.items()
        }
    tps = {n: statistics.median(r.tokens_per_s for r in rs) for n, rs in reports.items()}
    ttft = {n: statistics.median(p50(r.ttft_s) for r in rs) for n, rs in reports.items()}
    print(
        f"\ncluster (1 mock replica) / plain at {args.streams} streams x {args.max_tokens} tokens, "
        f"medians of {args.rounds} rounds:\n"
        f"  tokens/s {tps['cluster']:.1f} / {tps['plain']:.1f} = "
        f"{tps['cluster'] / tps['plain']:.3f} (goal >= 0.9)\n"
        f"  TTFT p50 {ttft['cluster'] * 1e3:.1f} ms vs {ttft['plain'] * 1e3:.1f} ms: "
        f"+{(ttft['cluster'] - ttft['plain']) * 1e3:.1f} ms (goal <= 10 ms)\n"
        f"  CPU per token {statistics.median(cpu_ms['cluster']):.3f} ms vs "
        f"{statistics.median(cpu_ms['plain']):.3f} ms (the server's processes, all of them)\n"
        f"  one request at a time ({args.probes} each, alternating): TTFT p50 "
        f"{alone['cluster'] * 1e3:.1f} ms vs {alone['plain'] * 1e3:.1f} ms: "
        f"+{(alone['cluster'] - alone['plain']) * 1e3:.1f} ms\n"
        f"  CPU per one-token request, {args.streams} at once: "
        f"{per_request['cluster'] * 1e3:.2f} ms vs {per_request['plain'] * 1e3:.2f} ms"
    )


def gpu(args: argparse.Namespace) -> None:
    model = ["--model", args.model] if args.model else []
    common = [
        "--engine", "hf", *model, "--max-concurrent", str(args.streams),
        "--max-queue-size", str(args.streams * 2), "--history", "memory",
        "--replica-gpus", "1", "--replica-cpus", "4",
    ]  # fmt: skip
    results = {}
    for num in (1, 2):
        with (
            tempfile.TemporaryDirectory() as tmp,
            running_server(
                *common, "--replicas", str(num), tmp_path=Path(tmp), ready_timeout_s=1200
            ) as server,
        ):
            wait_replicas(server, num, timeout_s=1200)
            bench(server.url, streams=num * 8, requests=num * 8, max_tokens=16)  # warm-up
            report = bench(
                server.url,
                streams=args.streams,
                requests=args.streams * 2,
                max_tokens=args.max_tokens,
            )
            results[num] = (report, loop_lag_p99_ms(server.url))
            print(f"{num} replica(s):", *report.lines(), sep="\n  ")
            print(f"  front event-loop lag p99 <= {results[num][1]:.1f} ms")
            server.terminate(120)  # SIGTERM: it stops the Ray it started
    one, two = results[1][0], results[2][0]
    print(
        f"\n2 replicas / 1 replica at {args.streams} streams: tokens/s "
        f"{two.tokens_per_s:.1f} / {one.tokens_per_s:.1f} = "
        f"{two.tokens_per_s / one.tokens_per_s:.2f}x (goal >= 1.9x); TTFT p50 "
        f"{p50(two.ttft_s) * 1e3:.0f} ms vs {p50(one.ttft_s) * 1e3:.0f} ms"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true", help="2 replicas / 1 on GPUs (needs two)")
    ap.add_argument("--model", help="--gpu: a local model folder (default: SmolLM2)")
    ap.add_argument("--streams", type=int, help="streams at once (CPU 32, GPU 128)")
    ap.add_argument("--max-tokens", type=int, help="tokens a reply (CPU 64, GPU 256)")
    ap.add_argument("--rounds", type=int, default=3, help="CPU: rounds per server")
    ap.add_argument("--probes", type=int, default=20, help="CPU: requests one at a time")
    ap.add_argument("--cluster-args", default="", help="CPU: more flags for the cluster server")
    args = ap.parse_args()
    args.streams = args.streams or (128 if args.gpu else 32)
    args.max_tokens = args.max_tokens or (256 if args.gpu else 64)
    gpu(args) if args.gpu else cpu(args)


if __name__ == "__main__":
    main()

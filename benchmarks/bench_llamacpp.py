"""chatqueue's llama.cpp engine against llama.cpp's own server, side by side in one run.

Builds `llama-server` from the very llama.cpp source that the installed llama-cpp-python vendors
(its sdist, fetched once with pip; cmake, CPU only, GGML_NATIVE as the runner's build), cached
under chatqueue's cache folder (`$CHATQUEUE_CACHE` or ~/.cache/chatqueue)/llama-server/VERSION. Then, at
each concurrency N: `chatqueue serve --max-concurrent N` (`--engine auto` unless `--engine` says
otherwise: what a user gets, llama.cpp up to 8 at once, transformers above) and `llama-server -np N
-cb --no-repack`, both on the default GGUF, one model thread each, the same per-slot context (and
CPU kernels: no extra buffer types, as the runner), both up at once
and measured alternately for several rounds (the machine is shared and noisy) with one load
generator: N streams of the same chat prompts, 64 greedy tokens each, EOS ignored. Prints per round
and as medians over the rounds: total tokens/s, the ratio chatqueue / llama.cpp, time to first token
p50, /health latency p99 (a probe every 50 ms from another process: how long a server leaves an
HTTP request waiting while it streams, the probe's own HTTP client included), and for chatqueue
its event loop's lag p99 (the bucket of `chatqueue_event_loop_lag_seconds` it falls in, counted
over the run from /metrics; llama-server has no such figure).

    .venv/bin/python benchmarks/bench_llamacpp.py                      # 1 8 32 streams, 3 rounds
    .venv/bin/python benchmarks/bench_llamacpp.py --concurrency 8 --rounds 5
    .venv/bin/python benchmarks/bench_llamacpp.py --engine llamacpp     # our llama.cpp runner at 32 too
    .venv/bin/python benchmarks/bench_llamacpp.py --build-only         # just build llama-server

Building by hand instead (what --build-only runs):
    pip download --no-deps llama-cpp-python==VERSION -d DIR && tar xzf DIR/llama_cpp_python-VERSION.tar.gz
    cmake -S llama_cpp_python-VERSION/vendor/llama.cpp -B build -DCMAKE_BUILD_TYPE=Release \\
      -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON \\
      -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_OPENSSL=OFF \\
      -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF
    cmake --build build --target llama-server -j 2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import math
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx
from prometheus_client.parser import text_string_to_metric_families

from _common import health_probe, pct, running_server, stream_chat
from bench_hf_batching import body, prompts
from chatqueue.engine.hf.gguf_cache import cache_root, default_gguf_path
from tests.support.servers import free_port

CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_OPENSSL=OFF",
    # NOTE: the server's web page is fetched from a hub or built with npm; neither is wanted.
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_UI=OFF",
]


def llama_server_binary(jobs: int) -> Path:
    """llama-server built from the installed llama-cpp-python's vendored llama.cpp (once)."""
    version = importlib.metadata.version("llama_cpp_python")
    root = cache_root() / "llama-server" / version
    binary = root / "build" / "bin" / "llama-server"
    if binary.is_file():
        return binary
    root.mkdir(parents=True, exist_ok=True)
    source = root / f"llama_cpp_python-{version}"
    if not source.is_dir():
        with tempfile.TemporaryDirectory(dir=root) as download:
            pip = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", download]
            subprocess.run([*pip, f"llama-cpp-python=={version}"], check=True)
            (sdist,) = Path(download).glob("*.tar.gz")
            with tarfile.open(sdist) as tar:
                tar.extractall(root, filter="data")
    began = time.perf_counter()
    llama = source / "vendor" / "llama.cpp"
    subprocess.run(["cmake", "-S", llama, "-B", root / "build", *CMAKE_FLAGS], check=True)
    build = ["cmake", "--build", root / "build", "--target", "llama-server", "-j", str(jobs)]
    subprocess.run(build, check=True)
    print(f"built {binary} in {time.perf_counter() - began:.0f} s", flush=True)
    return binary


@contextlib.contextmanager
def llama_server(binary: Path, *, slots: int, context: int, threads: int) -> Iterator[str]:
    port = free_port()
    argv = [
        str(binary),
        "-m",
        str(default_gguf_path()),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "-np",
        str(slots),
        "-cb",
        "-c",
        str(slots * context),
        "-t",
        str(threads),
        "-tb",
        str(threads),
        "--no-webui",
        # as chatqueue's runner loads the model (llamacpp/context.py): no AMX or repacked
        # weights (llama.cpp's AMX matmul crashes on this project's AVX-512 Xeon VMs)
        "--no-repack",
    ]
    log = Path(tempfile.mkdtemp()) / "llama-server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"llama-server exited: {log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError("llama-server not healthy after 120 s")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Run:
    tokens_per_s: float
    ttft_p50_s: float
    health_p99_s: float
    lag_p99_s: float = math.nan  # chatqueue only: the upper bound of its p99's bucket


def lag_buckets(url: str) -> dict[float, float] | None:
    """chatqueue's event-loop lag histogram (cumulative counts by upper bound); None elsewhere."""
    reply = httpx.get(f"{url}/metrics", timeout=10)
    if reply.status_code != 200:
        return None
    for family in text_string_to_metric_families(reply.text):
        if family.name == "chatqueue_event_loop_lag_seconds":
            return {
                float(sample.labels["le"]): sample.value
                for sample in family.samples
                if sample.name.endswith("_bucket")
            }
    return None


def lag_p99(before: dict[float, float], after: dict[float, float]) -> float:
    """The smallest bucket bound holding 99% of the samples taken between the two reads."""
    counts = sorted((bound, after[bound] - before.get(bound, 0.0)) for bound in after)
    total = counts[-1][1]
    return next(bound for bound, count in counts if count >= 0.99 * total)


@dataclass
class Side:
    runs: list[Run] = field(default_factory=list)

    def median(self, name: str) -> float:
        return statistics.median(getattr(run, name) for run in self.runs)


async def load(url: str, n: int, max_tokens: int) -> tuple[float, float]:
    """N streams at once: (total output tokens/s, time to first token p50)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=n + 4)) as session:

        async def one(prompt: str) -> tuple[float, list[float], int]:
            began = time.perf_counter()
            stamps, tokens = await stream_chat(session, url, body(prompt, max_tokens))
            return began, stamps, tokens

        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(p) for p in prompts(n)))
        elapsed = time.perf_counter() - t0
    tokens = sum(t for _, _, t in results)
    assert tokens == n * max_tokens, f"{tokens} tokens, expected {n * max_tokens}"
    ttfts = [stamps[0] - began for began, stamps, _ in results]
    return tokens / elapsed, pct(ttfts, 50)


def measure(url: str, n: int, max_tokens: int) -> Run:
    before = lag_buckets(url)
    with health_probe(url) as probes:
        tokens_per_s, ttft = asyncio.run(load(url, n, max_tokens))
    after = lag_buckets(url)
    lag = lag_p99(before, after) if before is not None and after is not None else math.nan
    return Run(tokens_per_s, ttft, pct([lat for _, lat in probes], 99), lag)


def compare(args: argparse.Namespace, binary: Path, n: int, tmp: Path) -> tuple[Side, Side]:
    ours, theirs = Side(), Side()
    flags = [
        "--engine",
        args.engine,
        "--max-concurrent",
        str(n),
        "--max-queue-size",
        str(n),
        "--max-model-len",
        str(args.context),
        "--torch-threads",
        str(args.threads),
        "--log-level",
        "warning",
        *args.serve_args.split(),
    ]
    env = {"OMP_WAIT_POLICY": "PASSIVE"}
    with (
        running_server(*flags, tmp_path=tmp, env=env) as srv,
        llama_server(binary, slots=n, context=args.context, threads=args.threads) as llama_url,
    ):
        for url in (srv.url, llama_url):  # warm up: first requests, caches, pages
            asyncio.run(load(url, min(n, 2), 8))
        for round_ in range(args.rounds):
            order = [("chatqueue", srv.url, ours), ("llama.cpp", llama_url, theirs)]
            for name, url, side in order if round_ % 2 == 0 else order[::-1]:
                run = measure(url, n, args.max_tokens)
                side.runs.append(run)
                print(
                    f"  {n:>2} streams round {round_ + 1} {name:>9}: {run.tokens_per_s:6.1f} tok/s"
                    f"  TTFT p50 {run.ttft_p50_s * 1e3:6.0f} ms"
                    f"  /health p99 {run.health_p99_s * 1e3:6.1f} ms"
                    + (f"  loop lag p99 <= {run.lag_p99_s * 1e3:g} ms" if side is ours else ""),
                    flush=True,
                )
            ratio = ours.runs[-1].tokens_per_s / theirs.runs[-1].tokens_per_s
            print(f"  {n:>2} streams round {round_ + 1} ratio chatqueue/llama.cpp {ratio:.2f}")
    return ours, theirs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="model threads, each side")
    ap.add_argument("--context", type=int, default=1024, help="KV tokens a slot, each side")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="build jobs")
    ap.add_argument("--engine", default="auto", choices=["auto", "llamacpp", "hf"])
    ap.add_argument("--serve-args", default="", help="more `chatqueue serve` flags")
    ap.add_argument("--build-only", action="store_true")
    args = ap.parse_args()
    binary = llama_server_binary(args.jobs)
    if args.build_only:
        return
    print(
        f"default GGUF {default_gguf_path().name}; chatqueue --engine {args.engine}; "
        f"{args.threads} model thread(s) each; "
        f"{args.max_tokens} greedy tokens a request, EOS ignored; {args.context} KV tokens a slot; "
        f"{args.rounds} rounds, alternating which server goes first",
        flush=True,
    )
    tmp = Path(tempfile.mkdtemp())
    table = []
    for n in args.concurrency:
        ours, theirs = compare(args, binary, n, tmp)
        ratios = [
            a.tokens_per_s / b.tokens_per_s for a, b in zip(ours.runs, theirs.runs, strict=True)
        ]
        table.append((n, ours, theirs, statistics.median(ratios)))
    print("\nmedians over the rounds:")
    print(
        "| streams | chatqueue tok/s | llama.cpp tok/s | ratio | TTFT p50 cq / llama "
        "| /health p99 cq / llama | cq loop lag p99 (worst round) |"
    )
    print("|---|---|---|---|---|---|---|")
    for n, ours, theirs, ratio in table:
        print(
            f"| {n} | {ours.median('tokens_per_s'):.1f} | {theirs.median('tokens_per_s'):.1f} "
            f"| {ratio:.2f} | {ours.median('ttft_p50_s') * 1e3:.0f} / "
            f"{theirs.median('ttft_p50_s') * 1e3:.0f} ms | "
            f"{ours.median('health_p99_s') * 1e3:.1f} / {theirs.median('health_p99_s') * 1e3:.1f} ms "
            f"| <= {max(run.lag_p99_s for run in ours.runs) * 1e3:g} ms |"
        )


if __name__ == "__main__":
    main()

"""Continuous batching on the real model, through the real HTTP server, side by side in one run.

Prints, for SmolLM2 (or --model) on this machine, each as a ratio measured in this run:
  - total output tokens/s at each concurrency, batching on ÷ `--batching off`;
  - ours through HTTP ÷ transformers' own continuous batching (`generate_batch`) in-process;
  - HTTP+SSE ÷ the same engine in-process (ChatQueue.submit, no HTTP);
  - event-loop lag p99 (a /health probe every 50 ms from another process) and peak RSS.

    .venv/bin/python benchmarks/bench_hf_batching.py --concurrency 8 32 --max-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

import aiohttp

from _common import health_probe, lag_summary, running_server, stream_chat

TOPICS = [
    "Tokyo",
    "the sea",
    "a cat",
    "bread",
    "rain",
    "music",
    "trees",
    "stars",
    "trains",
    "coffee",
    "winter",
    "books",
    "rivers",
    "bees",
    "clocks",
    "mountains",
]


def prompts(n: int) -> list[str]:
    """Distinct prompts of different lengths, so requests do not run in lock step."""
    return [
        f"Write {'a short' if i % 2 else 'a long'} story about {TOPICS[i % len(TOPICS)]}"
        f"{' and why it matters' * (i % 3)}."
        for i in range(n)
    ]


def body(prompt: str, max_tokens: int) -> dict[str, object]:
    return {
        "messages": [{"role": "user", "content": prompt}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }


async def http_run(url: str, n: int, max_tokens: int) -> float:
    """Total output tokens/s of n concurrent streams."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=n + 4)) as session:
        t0 = time.perf_counter()
        results = await asyncio.gather(
            *(stream_chat(session, url, body(p, max_tokens)) for p in prompts(n))
        )
        elapsed = time.perf_counter() - t0
    tokens = sum(t for _, t in results)
    assert tokens == n * max_tokens, f"{tokens} tokens, expected {n * max_tokens}"
    return tokens / elapsed


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def in_process(args: argparse.Namespace, n: int) -> tuple[float, float]:
    """(ours in-process tokens/s, transformers generate_batch tokens/s) on the same requests."""
    import torch
    from transformers import ContinuousBatchingConfig, GenerationConfig

    from _common import load_in_process
    from chatqueue import ChatMessage, ChatQueue, SamplingParams

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    runner = load_in_process(args.model)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    msgs = [[ChatMessage("user", p)] for p in prompts(n)]

    async def ours() -> float:
        cq = ChatQueue(runner, max_concurrent=n, max_queue_size=n)
        await cq.start_queue_worker()
        await cq.wait_ready(120)
        warm = [await cq.submit(m, params) for m in msgs[:2]]
        await asyncio.gather(*(s.collect() for s in warm))
        t0 = time.perf_counter()
        streams = [await cq.submit(m, params) for m in msgs]
        done = await asyncio.gather(*(s.collect() for s in streams))
        elapsed = time.perf_counter() - t0
        await cq.stop()
        return sum(d.usage.completion_tokens for d in done) / elapsed

    model = runner.model.model  # the HF model under our batched runner
    ids = [runner.tokenizer.apply_chat_template(m) for m in msgs]
    ours_tps = asyncio.run(ours())  # stopping the queue closes the runner
    gen = GenerationConfig(
        max_new_tokens=args.max_tokens,
        min_new_tokens=args.max_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    # NOTE: cache sized by hand, as transformers' CB needs on CPU: every request's whole length.
    longest = max(len(i) for i in ids) + args.max_tokens
    cb = ContinuousBatchingConfig(
        page_size=32,
        num_blocks=n * (longest // 32 + 2),
        max_batch_tokens=max(256, n * 4),
        use_cuda_graph=False,
    )
    # NOTE: not under inference_mode: generate_batch makes its tensors here and updates them in
    # place on its own thread, where inference tensors may not be written.
    model.generate_batch(ids[:2], generation_config=gen, continuous_batching_config=cb)
    t0 = time.perf_counter()
    out = model.generate_batch(ids, generation_config=gen, continuous_batching_config=cb)
    elapsed = time.perf_counter() - t0
    tokens = sum(len(o.generated_tokens) for o in out.values())
    assert tokens == n * args.max_tokens, f"generate_batch gave {tokens} tokens"
    return ours_tps, tokens / elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--model", default=None)
    ap.add_argument("--torch-threads", type=int, default=None)
    ap.add_argument("--skip-off", action="store_true", help="skip --batching off (slow)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    top = max(args.concurrency)
    flags = ["--max-concurrent", str(top), "--max-queue-size", str(top), "--log-level", "warning"]
    if args.model:
        flags += ["--model", args.model]
    if args.torch_threads:
        flags += ["--torch-threads", str(args.torch_threads)]
    # NOTE: as `chatqueue serve` does, and before torch is imported here (the in-process part).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env = {"OMP_WAIT_POLICY": os.environ["OMP_WAIT_POLICY"]}
    print(
        f"settings: {' '.join(flags)} OMP_WAIT_POLICY={env['OMP_WAIT_POLICY']} "
        f"max_tokens={args.max_tokens} (EOS ignored, greedy)",
        flush=True,
    )

    on: dict[int, float] = {}
    with running_server(*flags, "--batching", "on", tmp_path=tmp, env=env) as srv:
        asyncio.run(http_run(srv.url, 2, 8))  # warm up
        for n in args.concurrency:
            if n == top:
                with health_probe(srv.url) as lag:
                    start = time.perf_counter()
                    on[n] = asyncio.run(http_run(srv.url, n, args.max_tokens))
            else:
                on[n] = asyncio.run(http_run(srv.url, n, args.max_tokens))
            print(f"{n:>3} streams: batching on {on[n]:7.1f} tok/s", flush=True)
        rss = peak_rss_mib(srv.process.pid)
    print(f"event-loop lag at {top} streams: {lag_summary(lag, start)}")
    print(f"server peak RSS at {top} streams: {rss:.0f} MiB", flush=True)
    if not args.skip_off:
        with running_server(*flags, "--batching", "off", tmp_path=tmp, env=env) as srv:
            asyncio.run(http_run(srv.url, 2, 8))
            for n in args.concurrency:
                off = asyncio.run(http_run(srv.url, n, args.max_tokens))
                print(
                    f"{n:>3} streams: batching off {off:6.1f} tok/s | on/off = {on[n] / off:.2f}x",
                    flush=True,
                )
    ours_in, theirs = in_process(args, top)
    print(
        f"{top} streams: ours in-process {ours_in:.1f} tok/s ÷ transformers generate_batch "
        f"{theirs:.1f} tok/s = {ours_in / theirs:.2f}x (ours HTTP ÷ theirs = {on[top] / theirs:.2f}x)"
    )
    print(
        f"{top} streams: HTTP+SSE {on[top]:.1f} ÷ in-process {ours_in:.1f} tok/s = "
        f"{on[top] / ours_in:.2f}"
    )


if __name__ == "__main__":
    main()

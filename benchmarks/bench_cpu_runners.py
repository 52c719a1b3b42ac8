"""Two CPU runners of the default model in-process, side by side: by default llama.cpp (the GGUF)
against transformers (the GGUF dequantized to fp32, the paged runner with its decode rows packed
into the model's forward); `transformers-apart` is the paged runner with the family's decode
step apart (`--kv-cache paged`). One thread each, no server: decode tokens/s of N sequences
stepping together, alternating runners round by round. Prints each round's ratio first / second
and the medians. (The server against llama-server: bench_llamacpp.py.)

    .venv/bin/python benchmarks/bench_cpu_runners.py --concurrency 1 8 32 --steps 32 --rounds 3
    .venv/bin/python benchmarks/bench_cpu_runners.py --runners transformers-apart transformers
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_hf_batching import prompts
from chatqueue.api.build import load_hf, load_llamacpp
from chatqueue.config import Settings
from chatqueue.engine.runner import NewSequence, PagedKV, Runner, StepBatch
from chatqueue.types import ChatMessage, SamplingParams


def block_tables(runner: Runner, ids: list[list[int]], steps: int) -> list[list[int]]:
    """What the scheduler would hand a runner with a KV pool (the paged one): blocks for each
    prompt and `steps` + 1 tokens; none for a runner without one."""
    spec = runner.kv_spec if isinstance(runner, PagedKV) else None
    if spec is None:
        return [[] for _ in ids]
    free = iter(range(spec.num_blocks))
    return [[next(free) for _ in range(spec.blocks_for(len(p) + steps + 1))] for p in ids]


def decode_rate(runner: Runner, n: int, steps: int) -> float:
    """Prefill n prompts (in as many steps as the runner takes), then time `steps` decode steps
    of all n; tokens/s of the decode."""
    ids = [runner.tokenizer.apply_chat_template([ChatMessage("user", p)]) for p in prompts(n)]
    greedy = SamplingParams(temperature=0.0)
    tables = block_tables(runner, ids, steps + len(ids))
    new = [
        NewSequence(i, p, greedy, block_table=t)
        for i, (p, t) in enumerate(zip(ids, tables, strict=True))
    ]
    started = set(runner.step(StepBatch(new, [], [])).tokens)
    running = list(range(n))
    while len(started) < n:  # prompts cut into chunks: step until every one has its first token
        started |= set(runner.step(StepBatch([], running, [])).tokens)
    began = time.perf_counter()
    for _ in range(steps):
        runner.step(StepBatch([], running, []))
    elapsed = time.perf_counter() - began
    runner.step(StepBatch([], [], running))
    return n * steps / elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--runners",
        nargs=2,
        default=["llama.cpp", "transformers"],
        choices=["llama.cpp", "transformers", "transformers-apart"],
    )
    args = ap.parse_args()
    settings = Settings(
        device="cpu",
        dtype="float32",
        model_process="off",
        torch_threads=1,
        max_concurrent=max(args.concurrency),
        max_model_len=1024,
    )
    import torch

    torch.set_num_threads(1)
    loaders = {
        "llama.cpp": lambda: load_llamacpp(settings),
        "transformers": lambda: load_hf(settings.model_copy(update={"kv_cache": "dynamic"})),
        "transformers-apart": lambda: load_hf(settings.model_copy(update={"kv_cache": "paged"})),
    }
    first, second = args.runners
    runners = {name: loaders[name]() for name in args.runners}
    for n in args.concurrency:
        ratios = []
        for round_ in range(args.rounds):
            order = list(runners) if round_ % 2 == 0 else list(runners)[::-1]
            rates = {name: decode_rate(runners[name], n, args.steps) for name in order}
            ratios.append(rates[first] / rates[second])
            print(
                f"{n:>2} sequences round {round_ + 1}: {first} {rates[first]:6.1f} tok/s, "
                f"{second} {rates[second]:6.1f} tok/s, ratio {ratios[-1]:.2f}",
                flush=True,
            )
        print(f"{n:>2} sequences: median ratio {first} / {second} {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()

"""What logprobs cost in the batched sampler, side by side: one `SamplingBatch.sample` over a
batch's logits [B, V] where no row asks for logprobs (the plain path), where one row asks, and
where every row asks for 20 alternatives; measured in alternation, round by round, so that load
from other processes falls on all alike. Prints each median and its ratio to the plain path.

    .venv/bin/python benchmarks/bench_logprobs.py --batch 32 --vocab 49152 --rounds 200

Greedy rows (the cheap path: argmax only) and sampled rows (temperature, softmax, the race) are
timed separately.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from chatqueue.engine.hf.sampling import SamplingBatch, SamplingRequest
from chatqueue.types import SamplingParams


def make(batch: int, vocab: int, *, asking: int, temperature: float) -> SamplingBatch:
    requests = [
        SamplingRequest(
            SamplingParams(temperature=temperature, seed=i, logprobs=20 if i < asking else None),
            [1],
        )
        for i in range(batch)
    ]
    return SamplingBatch.create(requests, vocab_size=vocab, device=torch.device("cpu"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=49152)  # SmolLM2's
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--torch-threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)
    logits = torch.randn(args.batch, args.vocab)
    for temperature in (0.0, 1.0):
        cases = {
            "none ask": make(args.batch, args.vocab, asking=0, temperature=temperature),
            "one asks": make(args.batch, args.vocab, asking=1, temperature=temperature),
            "all ask": make(args.batch, args.vocab, asking=args.batch, temperature=temperature),
        }
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.rounds):
            for name, batch in cases.items():
                began = time.perf_counter()
                sampled = batch.sample(logits)
                if sampled.logprobs is not None:
                    sampled.logprobs.per_row()  # to the host, as a step does
                times[name].append(time.perf_counter() - began)
        base = statistics.median(times["none ask"])
        kind = "greedy" if temperature == 0 else "sampled"
        for name, ts in times.items():
            median = statistics.median(ts)
            print(
                f"{kind:8s} B={args.batch} V={args.vocab} {name:9s} "
                f"{median * 1e3:7.3f} ms  x{median / base:.2f}"
            )


if __name__ == "__main__":
    main()

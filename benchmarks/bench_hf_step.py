"""The batched runner's own cost per decode step, next to the bare forward pass it wraps.

Prints, for a batch of B running sequences of different prompt lengths, the median time of one
decode step through `HFBatchedRunner.step` and of one bare `model(...)` call with a DynamicCache on
the same left-padded batch (same widths, same mask), measured in alternation, step by step, so that
load from other processes falls on both alike; the ratio is the runner's overhead.

    .venv/bin/python benchmarks/bench_hf_step.py --batch 8 --steps 32 --rounds 3 --torch-threads 2

With `--threads 1 2` it times runner steps with each torch thread count in turn instead.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from transformers import DynamicCache

from _common import load_in_process
from bench_hf_batching import prompts
from chatqueue.engine.hf.runner import HFBatchedRunner
from chatqueue.engine.runner import NewSequence, StepBatch
from chatqueue.types import ChatMessage, SamplingParams


class RunnerSteps:
    """Decode steps through the runner, the way the engine loop drives it."""

    def __init__(self, runner: HFBatchedRunner, ids: list[list[int]]) -> None:
        params = SamplingParams(temperature=0, ignore_eos=True)
        new = [NewSequence(i, p, params) for i, p in enumerate(ids)]
        self.runner = runner
        self.running = list(range(len(ids)))
        runner.step(StepBatch(new=new, running=[], released=[]))

    def step(self) -> None:
        self.runner.step(StepBatch(new=[], running=self.running, released=[]))

    def close(self) -> None:
        self.runner.step(StepBatch(new=[], running=[], released=self.running))


class BareSteps:
    """The same batch through model(...) alone: left-padded prefill, then one token per row."""

    def __init__(self, runner: HFBatchedRunner, ids: list[list[int]]) -> None:
        self.model = runner.model
        width = max(len(p) for p in ids)
        input_ids = torch.tensor([[0] * (width - len(p)) + p for p in ids])
        self.mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids])
        positions = (self.mask.cumsum(1) - 1).clamp_min(0)
        self.cache = DynamicCache()
        with torch.inference_mode():
            self.token = self._forward(input_ids, positions)
        self.position = positions[:, -1:] + 1

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.model(
            input_ids=input_ids,
            attention_mask=self.mask,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1].argmax(-1, keepdim=True)

    def step(self) -> None:
        with torch.inference_mode():
            ones = torch.ones(len(self.mask), 1, dtype=self.mask.dtype)
            self.mask = torch.cat([self.mask, ones], dim=1)
            self.token = self._forward(self.token, self.position)
            self.position = self.position + 1
            self.token.tolist()


def timed(step: object) -> float:
    t0 = time.perf_counter()
    step()  # type: ignore[operator]
    return time.perf_counter() - t0


def one_round(
    runner: HFBatchedRunner, ids: list[list[int]], steps: int
) -> tuple[list[float], list[float]]:
    """Alternate one runner step and one bare step, so both see the same load and cache widths."""
    ours, bare = RunnerSteps(runner, ids), BareSteps(runner, ids)
    times = [(timed(ours.step), timed(bare.step)) for _ in range(steps)]
    ours.close()
    return [t for t, _ in times], [t for _, t in times]


def compare_threads(
    runner: HFBatchedRunner, ids: list[list[int]], args: argparse.Namespace
) -> None:
    """Runner steps with each torch thread count in turn, step by step, on the same batch."""
    times: dict[int, list[float]] = {n: [] for n in args.threads}
    for _ in range(args.rounds):
        ours = RunnerSteps(runner, ids)
        for _ in range(args.steps):
            for n in args.threads:
                torch.set_num_threads(n)
                times[n].append(timed(ours.step))
        ours.close()
    medians = {n: statistics.median(t) for n, t in times.items()}
    print(
        " | ".join(f"{n} thread(s) {m * 1e3:.1f} ms" for n, m in medians.items())
        + f" | ratio {medians[args.threads[0]] / medians[args.threads[-1]]:.3f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--torch-threads", type=int, default=None)
    ap.add_argument("--threads", type=int, nargs="+", help="compare these torch thread counts")
    args = ap.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    loaded = load_in_process()
    runner = HFBatchedRunner(loaded.model.model)  # type: ignore[attr-defined]
    ids = [
        loaded.tokenizer.apply_chat_template([ChatMessage("user", p)]) for p in prompts(args.batch)
    ]
    one_round(runner, ids, 4)  # warm up
    print(
        f"batch {args.batch}, {args.steps} steps x {args.rounds} rounds, "
        f"torch threads {torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}"
    )
    if args.threads:
        compare_threads(runner, ids, args)
        return
    ours: list[float] = []
    bare: list[float] = []
    for _ in range(args.rounds):
        o, b = one_round(runner, ids, args.steps)
        ours += o
        bare += b
    o, b = statistics.median(ours), statistics.median(bare)
    print(f"runner.step {o * 1e3:.1f} ms | bare model() {b * 1e3:.1f} ms | ratio {o / b:.3f}")


if __name__ == "__main__":
    main()

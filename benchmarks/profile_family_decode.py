"""Where a family's decode step goes on the GPU, beside Llama's: for each shape of
`bench_families.py` (bf16, random weights, 256-token prompts), at batch 1 and 64:
  - the graph's replay alone (device events) and the whole `runner.step` (host included), each
    beside the bandwidth floor;
  - the kernels of one compiled step (torch.profiler): how many, their total, and the top ones,
    so that a shape's time a layer can be split into its kernels.

    python benchmarks/profile_family_decode.py [--models llama-3.2-1b,gemma-3-1b] [--rows 18]
        [--trace DIR]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_families import (
    DECODE_STEPS,
    MODEL_CLASSES,
    PROMPT_TOKENS,
    copy_bandwidth,
    floor_ms,
    shaped,
)
from chatqueue.engine.hf.static import StaticCacheRunner
from chatqueue.engine.runner import NewSequence, StepBatch
from chatqueue.types import SamplingParams
from cuda_timing import replay_ms, wall_ms

BATCHES = (1, 64)


def snapshot(runner: StaticCacheRunner) -> tuple[int, torch.Tensor]:
    return runner.slots.col, runner.slots.pos.clone()


def restore(runner: StaticCacheRunner, kept: tuple[int, torch.Tensor]) -> None:
    runner.slots.pos.copy_(kept[1])
    runner.slots.set_col(kept[0])


def profile(name: str, bandwidth: float, rows: int, trace: str | None = None) -> None:
    config = shaped(name, quick=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = getattr(transformers, MODEL_CLASSES[name])(config).to(torch.bfloat16).eval()
    runner = StaticCacheRunner(
        model=model,
        max_batch=max(BATCHES),
        max_len=PROMPT_TOKENS + DECODE_STEPS + 64,
        prefill_chunk=4096,
        use_cuda_graphs=False,
        compile=True,
    )
    runner.graphs.buckets = sorted({max(2, b) for b in BATCHES})
    runner.graphs.capture()
    runner.slots.reset()
    print(f"== {name}: {runner.info}", flush=True)
    greedy = SamplingParams(temperature=0, ignore_eos=True)
    g = torch.Generator().manual_seed(0)
    for b in BATCHES:
        news = [
            NewSequence(
                i,
                torch.randint(3, config.vocab_size, (PROMPT_TOKENS,), generator=g).tolist(),
                greedy,
            )
            for i in range(b)
        ]
        ids = [n.rid for n in news]
        got = runner.step(StepBatch(new=news, running=[], released=[])).tokens
        while len(got) < b:
            got |= runner.step(StepBatch(new=[], running=ids, released=[])).tokens
        for _ in range(8):
            runner.step(StepBatch(new=[], running=ids, released=[]))
        bucket = max(2, b)
        graph = runner.graphs.captured[bucket].graph
        kept = snapshot(runner)  # a bare replay moves the column and positions on the device
        replays = replay_ms(graph, after=functools.partial(restore, runner, kept))
        walls = wall_ms(functools.partial(runner.step, StepBatch(new=[], running=ids, released=[])))
        floor = floor_ms(model, runner, b, bandwidth)
        replay, wall = statistics.median(replays), statistics.median(walls)
        kept = snapshot(runner)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            graph.replay()
            torch.cuda.synchronize()
        restore(runner, kept)
        events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        kernels = sum(1 for e in events if "memcpy" not in e.name.lower())
        total_us = sum(e.device_time for e in events)
        layers = config.num_hidden_layers
        print(
            f"{name} b={b}: floor {floor:.3f} ms; graph replay {replay:.3f} ms ({replay / floor:.2f}x), "
            f"runner.step {wall:.3f} ms ({wall / floor:.2f}x); host beyond replay {wall - replay:.3f} ms; "
            f"{kernels} kernels a step ({kernels / layers:.1f} a layer), {total_us / 1e3:.3f} ms of "
            f"kernel time, (replay - floor) / layer {(replay - floor) * 1e3 / layers:.1f} us",
            flush=True,
        )
        print(
            prof.key_averages().table(
                sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70
            )
        )
        if trace is not None:  # the step's kernels in order, to read one layer's sequence
            lines = [f"{e.device_time:9.1f} us  {e.name}" for e in events]
            Path(trace, f"{name}-b{b}.txt").write_text("\n".join(lines) + "\n")
        runner.step(StepBatch(new=[], running=[], released=ids))
    runner.close()
    del runner, model
    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="llama-3.2-1b,gemma-3-1b")
    ap.add_argument("--rows", type=int, default=18)
    ap.add_argument("--trace", default=None, help="a folder: each step's kernels, in order")
    args = ap.parse_args()
    bandwidth = copy_bandwidth("cuda")
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s", flush=True)
    for name in args.models.split(","):
        profile(name, bandwidth, args.rows, args.trace)


if __name__ == "__main__":
    main()

"""Where a decode step's time goes on the GPU: graph replay alone (device events), the whole
`runner.step` (host included), and the top kernels of one compiled step (torch.profiler).

    python benchmarks/profile_gpu_decode.py
"""

from __future__ import annotations

import functools
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from chatqueue.engine.runner import NewSequence, StepBatch
from chatqueue.types import SamplingParams
from cuda_timing import replay_ms, wall_ms
from gpu_model import build_model, static_runner


def main() -> None:
    model = build_model()
    runner = static_runner(model, max_batch=64, max_len=512)
    static = runner.model  # the StaticCacheRunner inside the TokenizedRunner
    greedy = SamplingParams(temperature=0, ignore_eos=True)
    g = torch.Generator().manual_seed(0)
    for b in (1, 64):
        news = [
            NewSequence(i, torch.randint(1000, 9000, (256,), generator=g).tolist(), greedy)
            for i in range(b)
        ]
        ids = [n.rid for n in news]
        runner.step(StepBatch(new=news, running=[], released=[]))
        for _ in range(10):
            runner.step(StepBatch(new=[], running=ids, released=[]))
        graph = static.graphs.captured[b].graph
        times = replay_ms(graph)
        walls = wall_ms(functools.partial(runner.step, StepBatch(new=[], running=ids, released=[])))
        print(
            f"b={b}: graph replay {statistics.median(times):.3f} ms (device), "
            f"runner.step {statistics.median(walls):.3f} ms (wall)"
        )
        with (
            torch.inference_mode(),
            torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof,
        ):
            static.graphs.step(b)  # the compiled step, as the graphs replay it
            torch.cuda.synchronize()
        print(
            prof.key_averages().table(
                sort_by="cuda_time_total", row_limit=25, max_name_column_width=90
            )
        )
        # the profiled step above moved the write column; keep host and device in agreement
        static.slots.set_col(static.slots.col - 1)
        runner.step(StepBatch(new=[], running=[], released=ids))


if __name__ == "__main__":
    main()

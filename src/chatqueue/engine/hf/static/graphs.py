"""The decode step made fast: captured as a CUDA graph at each of a set of batch sizes (buckets); a
batch runs at the smallest bucket that holds it, the rows past it idle. (The step itself is
compiled by the decode class, a layer at a time.)"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 512)

DecodeStep = Callable[[int], torch.Tensor]
"""Rows [0, b) one token on: b -> their logits [b, vocab]; capturable."""


@dataclass(frozen=True, slots=True)
class CapturedStep:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # the graph's output, rewritten in place by every replay


class DecodeGraphs:
    def __init__(
        self,
        forward: DecodeStep,
        *,
        max_batch: int,
        smallest: int = 1,
        buckets: Sequence[int] = _BUCKETS,
        what: str = "decode",
    ) -> None:
        """`smallest`: the least bucket. Captured graphs start at 2: Dynamo compiles a size of 1
        apart from the others (it specialises 0 and 1), which cost a restart another 7-10 s on
        an H200, and one idle row more at batch 1 costs nothing measurable there. `buckets`:
        the sizes to capture (up to `max_batch`, which is one of them); `what`: for the log."""
        low = min(smallest, max_batch)
        self.buckets = [b for b in buckets if low <= b < max_batch] + [max_batch]
        self._what = what
        self.captured: dict[int, CapturedStep] = {}
        self.step: DecodeStep = forward

    def run(self, n: int) -> torch.Tensor:
        """Rows [0, n) one token on; returns logits of at least n rows."""
        bucket = self.buckets[bisect.bisect_left(self.buckets, n)]
        if bucket in self.captured:
            captured = self.captured[bucket]
            captured.graph.replay()
            return captured.logits
        return self.step(bucket)

    def capture(self) -> None:
        """Capture the step at every bucket size. The warm-up and captured steps write into the
        cache's buffers: call it before any sequence holds a row, and reset them after."""
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        took: dict[int, float] = {}
        with torch.inference_mode():
            for b in reversed(self.buckets):
                began = time.perf_counter()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(2):  # warm-up: compiled, kernels chosen, workspaces made
                        self.step(b)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = self.step(b)
                self.captured[b] = CapturedStep(graph, logits)
                torch.cuda.synchronize()
                took[b] = time.perf_counter() - began
        log.info(
            "captured %s graphs for sizes %s in %.1f s (compiling included): %s",
            self._what,
            self.buckets,
            sum(took.values()),
            ", ".join(f"{b}: {t:.1f} s" for b, t in took.items()),
        )

    def clear(self) -> None:
        self.captured.clear()

"""Decode attention alone, at the shapes of the GPU benchmark (8 KV heads x 4 query heads each,
head dim 64, a 512-column static cache whose rows hold runs of columns [start, col]): which
kernel is fastest inside a CUDA graph, as the decode step runs it, and is it right? Bandwidth-bound, so each variant is also shown as GB/s of the
K and V columns the rows actually hold ("live"), and its error against a float64 reference.

    python benchmarks/micro_decode_attention.py
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cuda_timing import replay_ms


def manual(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    scores = torch.matmul(q, k.transpose(-1, -2)) * 0.125 + bias
    return torch.matmul(torch.softmax(scores.float(), dim=-1).to(q.dtype), v)


def timed(fn, *args) -> float:  # type: ignore[no-untyped-def]
    """ms per call of `fn`, replayed from a CUDA graph of 16 calls (one step's worth of layers),
    as the decode step runs it: launch costs on the host are not counted."""
    stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(16):
            fn(*args)
    return statistics.median(replay_ms(graph)) / 16


def sdpa(backend: SDPBackend | None):  # type: ignore[no-untyped-def]
    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)

    return run


def triton_live(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    from chatqueue.engine.hf.triton_decode import decode_attention

    start, col, last = _RUNS[id(bias)]
    # the step's own key and value: the cache's, written back where they are
    new_k, new_v = k[:, :, last : last + 1], v[:, :, last : last + 1]
    return decode_attention(q, k, v, new_k, new_v, start, col, 0.125, 0.0, False)


_RUNS: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}


def main() -> None:
    variants = {
        "triton live cols": triton_live,
        "sdpa default": sdpa(None),
        "sdpa efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION),
        "sdpa cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
        "sdpa math": sdpa(SDPBackend.MATH),
        "manual eager": manual,
        "manual compiled": torch.compile(manual, dynamic=True),
    }
    for b, cols, live in ((64, 512, 280), (64, 512, 500), (1, 512, 280), (256, 512, 384)):
        q = torch.randn(b, 8, 4, 64, dtype=torch.bfloat16, device="cuda")
        k = torch.randn(b, 8, cols, 64, dtype=torch.bfloat16, device="cuda")
        v = torch.randn_like(k)
        col = torch.tensor([live - 1], device="cuda")
        start = torch.randint(0, live // 2, (b,), device="cuda")  # rows of different lengths
        start[0] = 0
        columns = torch.arange(cols, device="cuda")
        outside = (columns < start[:, None]) | (columns > col)
        bias = (outside.to(torch.bfloat16) * -1e30).view(b, 1, 1, cols)
        _RUNS[id(bias)] = (start, col, live - 1)
        kv_gb = 2 * 2 * 8 * 64 * int((col + 1 - start).sum()) / 1e9
        args = (q, k, v, bias)
        ref = manual(q.double(), k.double(), v.double(), bias.double()).float()
        for name, fn in variants.items():
            try:
                err = ((fn(*args).float() - ref).norm() / ref.norm()).item()
                ms = timed(fn, *args)
                print(
                    f"b={b} live<={live}/{cols} {name:16s} {ms * 1e3:7.1f} us/layer "
                    f"{kv_gb / (ms / 1e3):6.0f} GB/s live rel.err {err:.1e}"
                )
            except Exception as exc:
                print(f"b={b} live<={live} {name:16s} failed: {str(exc)[:300]}")
    # float32 (the exact path the correctness checks use)
    q, k, v, bias = (t.float() for t in args)
    _RUNS[id(bias)] = _RUNS[id(args[3])]
    err = ((triton_live(q, k, v, bias) - ref).norm() / ref.norm()).item()
    print(f"float32 triton live cols rel.err {err:.1e}")


if __name__ == "__main__":
    main()

"""Decode attention alone, at the shapes of the GPU benchmark (batch 64, 8 KV heads x 4 query
heads each, head dim 64): which kernel reads the KV cache fastest? Bandwidth-bound, so each
variant is also shown as GB/s of K and V read.

    python benchmarks/micro_decode_attention.py
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def manual(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    scores = torch.matmul(q, k.transpose(-1, -2)) * 0.125 + bias
    return torch.matmul(torch.softmax(scores.float(), dim=-1).to(q.dtype), v)


def timed(fn, *args) -> float:  # type: ignore[no-untyped-def]
    for _ in range(5):
        fn(*args)
    times = []
    for _ in range(50):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(16):  # one step's worth of layers
            fn(*args)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 16)
    return statistics.median(times)


def main() -> None:
    compiled = torch.compile(manual, dynamic=True)
    for b, cols in ((64, 512), (64, 384), (1, 512)):
        q = torch.randn(b, 8, 4, 64, dtype=torch.bfloat16, device="cuda")
        k = torch.randn(b, 8, cols, 64, dtype=torch.bfloat16, device="cuda")
        v = torch.randn_like(k)
        valid = torch.rand(b, cols, device="cuda") < 0.7
        bias = ((~valid).to(torch.bfloat16) * -1e30).view(b, 1, 1, cols)
        kv_gb = 2 * k.numel() * 2 / 1e9
        variants = {
            "sdpa default": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias),
            "manual eager": lambda: manual(q, k, v, bias),
            "manual compiled": lambda: compiled(q, k, v, bias),
        }
        for name, backend in (
            ("efficient", SDPBackend.EFFICIENT_ATTENTION),
            ("cudnn", SDPBackend.CUDNN_ATTENTION),
            ("math", SDPBackend.MATH),
        ):

            def run(backend=backend) -> torch.Tensor:  # type: ignore[no-untyped-def]
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)

            variants[f"sdpa {name}"] = run
        ref = manual(q.double(), k.double(), v.double(), bias.double()).float()
        for name, fn in variants.items():
            try:
                err = ((fn().float() - ref).norm() / ref.norm()).item()
                ms = timed(fn)
                print(
                    f"b={b} cols={cols} {name:16s} {ms * 1e3:7.1f} us/layer "
                    f"{kv_gb / (ms / 1e3):6.0f} GB/s rel.err {err:.1e}"
                )
            except RuntimeError as exc:
                print(f"b={b} cols={cols} {name:16s} failed: {str(exc)[:80]}")


if __name__ == "__main__":
    main()

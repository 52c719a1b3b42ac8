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


def sdpa(backend: SDPBackend | None):  # type: ignore[no-untyped-def]
    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)

    return run


def main() -> None:
    variants = {
        "sdpa default": sdpa(None),
        "sdpa efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION),
        "sdpa cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
        "sdpa math": sdpa(SDPBackend.MATH),
        "manual eager": manual,
        "manual compiled": torch.compile(manual, dynamic=True),
    }
    for b, cols in ((64, 512), (64, 384), (1, 512)):
        q = torch.randn(b, 8, 4, 64, dtype=torch.bfloat16, device="cuda")
        k = torch.randn(b, 8, cols, 64, dtype=torch.bfloat16, device="cuda")
        v = torch.randn_like(k)
        valid = torch.rand(b, cols, device="cuda") < 0.7
        bias = ((~valid).to(torch.bfloat16) * -1e30).view(b, 1, 1, cols)
        kv_gb = 2 * k.numel() * 2 / 1e9
        args = (q, k, v, bias)
        ref = manual(q.double(), k.double(), v.double(), bias.double()).float()
        for name, fn in variants.items():
            try:
                err = ((fn(*args).float() - ref).norm() / ref.norm()).item()
                ms = timed(fn, *args)
                print(
                    f"b={b} cols={cols} {name:16s} {ms * 1e3:7.1f} us/layer "
                    f"{kv_gb / (ms / 1e3):6.0f} GB/s rel.err {err:.1e}"
                )
            except RuntimeError as exc:
                print(f"b={b} cols={cols} {name:16s} failed: {str(exc)[:80]}")


if __name__ == "__main__":
    main()

"""Where the static runner's start goes with warm compile caches: the first compiled call at the
largest bucket (Dynamo tracing, the caches' lookups, kernel loads) and the rest of the capture,
with Dynamo's own per-phase times.

    python3 benchmarks/profile_gpu_compile.py --cache /tmp/cq-start/cache   # after bench_gpu_start
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default="/tmp/cq-start/cache")
    ap.add_argument("--max-batch", type=int, default=64)
    args = ap.parse_args()
    cache = Path(args.cache)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache / "compile" / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(cache / "compile" / "triton"))
    logging.basicConfig(
        level=logging.INFO, format="%(relativeCreated)7.0f ms %(name)s: %(message)s"
    )
    t0 = time.perf_counter()
    import torch
    import torch._dynamo.utils

    from gpu_model import build_model

    print(f"import torch: {time.perf_counter() - t0:.1f} s", flush=True)
    t = time.perf_counter()
    torch.ones(8, 8, device="cuda").sum().item()
    print(f"CUDA context: {time.perf_counter() - t:.1f} s", flush=True)
    t = time.perf_counter()
    model = build_model("cuda", torch.bfloat16)
    print(f"model (random init): {time.perf_counter() - t:.1f} s", flush=True)
    from chatqueue.engine.hf.static import StaticCacheRunner

    t = time.perf_counter()
    StaticCacheRunner(model=model, max_batch=args.max_batch, max_len=4096)
    print(f"static runner (compile + capture): {time.perf_counter() - t:.1f} s", flush=True)
    print(torch._dynamo.utils.compile_times(repr="str"), flush=True)


if __name__ == "__main__":
    main()

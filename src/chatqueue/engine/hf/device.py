"""The device and dtype a model runs on, from Settings' names, and the device made ready to run.

Imports torch only: a model process calls `warm_device` on a thread while it still imports
transformers and the compiler (`engine/loading.py`).
"""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, not {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for, but torch sees no CUDA device")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # CPUs lack fast half-precision matmuls; GPUs want bf16, which keeps fp32's range.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, not {name!r}")
    return dtypes[name]


def warm_device(device_name: str, dtype_name: str) -> None:
    """On a GPU: the CUDA context, the allocator and a cuBLAS handle, made once (on a CPU,
    nothing). The first run on a device pays for them."""
    device = resolve_device(device_name)
    if device.type == "cuda":
        ones = torch.ones(8, 8, device=device, dtype=resolve_dtype(dtype_name, device))
        (ones @ ones).sum().item()

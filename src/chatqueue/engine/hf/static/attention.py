"""Decode attention over the static cache's rows, for any model family's decode step: a layer's new
key and value go into column `col`, then each row attends to its own columns [start, col] (or the
last W of them in a sliding-window layer, whose rows are rings of W columns), read alone by a
Triton kernel or all of them under a mask by SDPA (or by transformers' eager ops where scores are
soft-capped)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from chatqueue.engine.hf.static.slots import KvSlots


@dataclass(frozen=True, slots=True)
class Span:
    """Which positions rows [0, b) attend to in the layers of one attention span (full, or one
    sliding window), and where their new key and value go. The static cache: an additive mask
    over every column a row holds (SDPA, eager), or each row's first column (Triton, which reads
    [start, col] alone); in a ring (a window's layers), `slot` is the column `col` is kept at,
    for the masked path's write. The paged pool (`paged/decode.py`) also gives each row's block
    table, its end and the slot its new token's KV is written to. `window`: the span's sliding
    window, for attention that applies it itself (the packed step's)."""

    mask: torch.Tensor | None
    start: torch.Tensor | None
    table: torch.Tensor | None = None
    end: torch.Tensor | None = None
    slot: torch.Tensor | None = None
    window: int | None = None


class SlotAttention:
    def __init__(
        self,
        slots: KvSlots,
        *,
        choice: str,
        num_heads: int,
        scale: float,
        softcap: float | None = None,
    ) -> None:
        """`choice`: "triton" reads only the columns each row holds (CUDA only), "sdpa" all of
        them under a mask; "auto" is Triton where it can run. `softcap`: scores become
        softcap * tanh(scores / softcap) before the softmax (Gemma2), as transformers' eager
        attention does; SDPA cannot, so the masked path then runs those same eager ops."""
        self._slots = slots
        self._num_heads = num_heads
        self._scale = scale
        self._softcap = softcap
        self._columns = torch.arange(slots.max_len, device=slots.device)
        self.triton = triton_attention(choice, slots.device, slots.shape.head_dim)

    @property
    def kernel(self) -> str:
        if self.triton is not None:
            return "triton"
        return "eager (soft-capped)" if self._softcap else "sdpa"

    def spans(self, b: int, windows: Sequence[int | None]) -> dict[int | None, Span]:
        """Rows [0, b)'s columns for each attention span in `windows` (None: all the row holds;
        W: its last W positions, the query's own included, as transformers' sliding-window mask
        `kv > q - W`). Computed once a step, shared by the layers of that span."""
        slots = self._slots
        spans = {}
        for window in windows:
            start = slots.start[:b]
            if window is not None:
                start = torch.maximum(start, slots.col_t - (window - 1))
            if self.triton is not None:
                spans[window] = Span(None, start)
                continue
            length, col = slots.columns(window), slots.col_t
            if length == slots.max_len:
                outside = (self._columns < start[:, None]) | (self._columns > col)
                slot = None
            else:  # ring index i holds column col - (col - i) % length, the latest of its kind
                held = col - (col - self._columns[:length]) % length
                outside = held < start[:, None]
                slot = col % length
            # additive, not bool: a bool mask would be converted again in each layer
            dtype = slots.dtype
            mask = (outside.to(dtype) * torch.finfo(dtype).min).view(b, 1, 1, length)
            spans[window] = Span(mask, None, slot=slot)
        return spans

    def attend_into(
        self,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        *,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        span: Span,
    ) -> torch.Tensor:
        """Rows [0, b)'s new k, v [b, KV, 1, D] into the layer's cache buffers, then q
        [b, H, 1, D] over the span's columns; returns [b, KV, H / KV, D]. The buffers are given,
        not looked up by layer, so one compiled layer serves every layer. Only static buffers,
        no host synchronisation (capturable)."""
        slots, b = self._slots, q.shape[0]
        shape = slots.shape
        col = slots.col_t
        # NOTE: grouped-query attention as a query of length `groups` per KV head: same
        # result as repeating K/V, without copying them, and the fused kernels accept it.
        groups = self._num_heads // shape.kv_heads
        q = q.reshape(b, shape.kv_heads, groups, shape.head_dim)
        if self.triton is not None:  # the kernel writes the new k, v itself
            assert span.start is not None
            ring = k_cache.shape[2] < slots.max_len
            o: torch.Tensor = self.triton.decode_attention(
                q, k_cache, v_cache, k, v, span.start, col, self._scale, self._softcap or 0.0, ring
            )
            return o
        write_kv(k_cache, v_cache, k, v, col if span.slot is None else span.slot)
        return attend_masked(q, k_cache[:b], v_cache[:b], span.mask, self._scale, self._softcap)


def attend_masked(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    softcap: float | None,
) -> torch.Tensor:
    """Every column under an additive mask: SDPA, or transformers' eager ops where scores are
    soft-capped (SDPA cannot)."""
    if softcap:
        return _eager_softcapped(q, keys, values, mask, scale, softcap)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)


def _eager_softcapped(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    softcap: float,
) -> torch.Tensor:
    """transformers' eager attention with soft-capping (Gemma2's), op for op."""
    scores = torch.matmul(q, keys.transpose(2, 3)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, values)


@torch.library.custom_op("chatqueue::write_kv", mutates_args=("k_cache", "v_cache"))
def write_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    col: torch.Tensor,
) -> None:
    """Rows [0, B)'s new key and value [B, KV, 1, D] into column `col` of the whole caches.

    NOTE: an op of its own that names the whole cache buffers it mutates. Written inline as
    `cache[:b].index_copy_(...)` on a slice, Inductor copied both whole buffers every step (1.8 of
    3.4 ms a step at batch 64 on an H200); through this op the write stays in place."""
    b = k.shape[0]
    k_cache[:b].index_copy_(2, col, k)
    v_cache[:b].index_copy_(2, col, v)


@write_kv.register_fake
def _(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    col: torch.Tensor,
) -> None:
    return None


def triton_attention(choice: str, device: torch.device, head_dim: int) -> Any:
    """The Triton decode-attention module, or None where SDPA is to be used."""
    if choice not in ("auto", "triton", "sdpa"):
        raise ValueError(f"attention must be auto, triton or sdpa, not {choice!r}")
    usable = device.type == "cuda" and head_dim in (16, 32, 64, 128, 256)
    if choice == "sdpa" or (choice == "auto" and not usable):
        return None
    try:
        from chatqueue.engine.hf import triton_decode
    except ImportError as exc:
        if choice == "triton":
            raise ValueError(f"Triton decode attention is not available: {exc}") from exc
        return None
    if not usable:
        raise ValueError("Triton decode attention needs CUDA and a power-of-two head size")
    return triton_decode

"""Decode attention over the static cache's rows, for any model family's decode step: a layer's new
key and value go into column `col`, then each row attends to its own columns [start, col], read
alone by a Triton kernel or all of them under a mask by SDPA."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from chatqueue.engine.hf.static.slots import KvSlots


class SlotAttention:
    def __init__(self, slots: KvSlots, *, choice: str, num_heads: int, scale: float) -> None:
        """`choice`: "triton" reads only the columns each row holds (CUDA only), "sdpa" all of
        them under a mask; "auto" is Triton where it can run."""
        self._slots = slots
        self._num_heads = num_heads
        self._scale = scale
        self._columns = torch.arange(slots.max_len, device=slots.device)
        self.triton = triton_attention(choice, slots.device, slots.shape.head_dim)
        # one split of the columns per 256: a batch of 1 still spreads over several programs
        self._num_splits = -(-slots.max_len // 256)

    def mask(self, b: int) -> torch.Tensor | None:
        """Rows [0, b)'s columns outside [start, col] as one additive mask for every layer (a
        bool mask would be converted again in each); None where Triton reads only those."""
        if self.triton is not None:
            return None
        slots = self._slots
        outside = (self._columns < slots.start[:b, None]) | (self._columns > slots.col_t)
        dtype = slots.dtype
        return (outside.to(dtype) * torch.finfo(dtype).min).view(b, 1, 1, slots.max_len)

    def attend(
        self,
        layer: int,
        *,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Rows [0, b)'s new k, v [b, KV, 1, D] into the cache, then q [b, H, 1, D] over it;
        returns [b, KV, H / KV, D]. Only static buffers, no host synchronisation (capturable)."""
        slots = self._slots
        return self.attend_into(slots.k[layer], slots.v[layer], q=q, k=k, v=v, mask=mask)

    def attend_into(
        self,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        *,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """`attend` with the layer's cache buffers given, not looked up by index: a compiled
        layer then takes them as inputs and serves every layer."""
        slots, b = self._slots, q.shape[0]
        shape = slots.shape
        col = slots.col_t
        write_kv(k_cache, v_cache, k, v, col)
        keys, values = k_cache[:b], v_cache[:b]
        # NOTE: grouped-query attention as a query of length `groups` per KV head: same
        # result as repeating K/V, without copying them, and the fused kernels accept it.
        groups = self._num_heads // shape.kv_heads
        q = q.reshape(b, shape.kv_heads, groups, shape.head_dim)
        if self.triton is not None:
            o: torch.Tensor = self.triton.decode_attention(
                q,
                keys,
                values,
                start=slots.start[:b],
                col=col,
                scale=self._scale,
                num_splits=self._num_splits,
            )
        else:
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self._scale)
        return o


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

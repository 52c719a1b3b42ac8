"""Decode attention on the GPU over only the positions each row holds (a Triton kernel).

The static cache gives every row one run of columns [start, col]; SDPA with a mask reads all
`max_len` columns of every row and throws most away. This kernel reads [start, col] alone, in
splits (flash-decoding) so that a small batch still fills the GPU: each program owns one (row,
KV head) and one split of the columns, and answers for that KV head's whole group of query heads
at once, so each K/V element is read once per step. The splits' partial results are merged with
their log-sum-exp weights in plain torch ops (Inductor fuses them).

The paged pool (`paged/pool.py`) is read by the same kernel: row r's position n lives in block
`table[r, n // block_size]` at offset `n % block_size`, and the row attends to its positions
[start[r], end[r]).

Only imported where Triton and CUDA exist; `decode_attention` is a custom op, so Inductor treats
it as one opaque kernel and CUDA graphs capture its launch.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

BLOCK_N = 64  # columns per inner iteration


@triton.jit  # type: ignore[untyped-decorator]
def attend_block(  # type: ignore[no-untyped-def]  # Triton tensors and constexprs
    q,
    m_i,
    l_i,
    acc,
    k_base,
    v_base,
    table_row,  # PAGED: the row's block table
    n0,
    hi,
    position,  # CAUSAL: each query row's position
    stride_kn,
    stride_vn,
    scale,
    softcap,
    D: tl.constexpr,
    BLOCK: tl.constexpr,
    PAGED: tl.constexpr,
    BS: tl.constexpr,
    IEEE: tl.constexpr,
    SOFTCAP: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    """Positions [n0, n0 + BLOCK) below `hi` into the query rows' running softmax (max `m_i`, sum
    `l_i`, unnormalised output `acc`): their keys and values read at `k_base`, `v_base` (through
    `table_row` where PAGED), scores scaled (and soft-capped), a position past a row's own
    unseen where CAUSAL. Returns the new (m_i, l_i, acc). Shared by this module's kernel and
    the packed one (`triton_packed.py`)."""
    offs_n = n0 + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D)
    in_run = offs_n < hi
    if PAGED:
        block = tl.load(table_row + offs_n // BS, mask=in_run, other=0)
        where = block.to(tl.int64) * BS + offs_n % BS
    else:
        where = offs_n
    k = tl.load(
        k_base + where[:, None] * stride_kn + offs_d[None, :], mask=in_run[:, None], other=0.0
    )
    v = tl.load(
        v_base + where[:, None] * stride_vn + offs_d[None, :], mask=in_run[:, None], other=0.0
    )
    if IEEE:  # noqa: SIM108  (Triton: a constexpr branch, not a ternary)
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = s * scale
    if SOFTCAP:  # Gemma2: softcap * tanh(s / softcap), tanh(x) written as 2 sigmoid(2x) - 1
        s = softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0)
    seen = in_run[None, :]
    if CAUSAL:
        seen = seen & (offs_n[None, :] <= position[:, None])
    s = tl.where(seen, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp(s - m_new[:, None])
    alpha = tl.exp(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit  # type: ignore[untyped-decorator]
def _partials_kernel(  # type: ignore[no-untyped-def]  # Triton pointers and constexprs
    q_ptr,
    k_ptr,
    v_ptr,
    start_ptr,
    col_ptr,  # static: the one last column of every row; paged: each row's end (exclusive)
    table_ptr,  # paged: each row's block table
    o_ptr,
    m_ptr,
    l_ptr,
    stride_qb,
    stride_qh,
    stride_qg,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_tb,
    scale,
    softcap,
    NUM_KV: tl.constexpr,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    D: tl.constexpr,
    BLOCK: tl.constexpr,
    SPLIT: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    IEEE: tl.constexpr,
    SOFTCAP: tl.constexpr,
    PAGED: tl.constexpr,
    BS: tl.constexpr,  # paged: tokens a block
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // NUM_KV
    h = pid % NUM_KV
    lo = tl.maximum(tl.load(start_ptr + b), split * SPLIT)
    if PAGED:
        hi = tl.minimum(tl.load(col_ptr + b), (split + 1) * SPLIT)
        k_base = k_ptr + h * stride_kh  # the pool: [kv_heads, slots, head_dim] a layer
        v_base = v_ptr + h * stride_vh
    else:
        hi = tl.minimum(tl.load(col_ptr) + 1, (split + 1) * SPLIT)
        k_base = k_ptr + b * stride_kb + h * stride_kh
        v_base = v_ptr + b * stride_vb + h * stride_vh
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D)
    is_head = offs_g < G
    q = tl.load(
        q_ptr + b * stride_qb + h * stride_qh + offs_g[:, None] * stride_qg + offs_d[None, :],
        mask=is_head[:, None],
        other=0.0,
    )
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    for n0 in range(lo, hi, BLOCK):
        m_i, l_i, acc = attend_block(
            q,
            m_i,
            l_i,
            acc,
            k_base,
            v_base,
            table_ptr + b * stride_tb,
            n0,
            hi,
            offs_g,
            stride_kn,
            stride_vn,
            scale,
            softcap,
            D=D,
            BLOCK=BLOCK,
            PAGED=PAGED,
            BS=BS,
            IEEE=IEEE,
            SOFTCAP=SOFTCAP,
            CAUSAL=False,
        )
    row = (pid * G + offs_g) * NUM_SPLITS + split  # in [B * NUM_KV * G, NUM_SPLITS]
    tl.store(m_ptr + row, m_i, mask=is_head)
    tl.store(l_ptr + row, l_i, mask=is_head)
    tl.store(o_ptr + row[:, None] * D + offs_d[None, :], acc, mask=is_head[:, None])


def _partials(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    start: torch.Tensor,
    end: torch.Tensor,
    table: torch.Tensor,
    k_strides: tuple[int, int, int],
    v_strides: tuple[int, int, int],
    max_len: int,
    scale: float,
    num_splits: int,
    softcap: float,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the kernel: `k_strides`, `v_strides` (row, head, position); `block_size` > 0
    reads through `table` (paged), else `end` is the static cache's one last column."""
    b, num_kv, groups, dim = q.shape
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
    o, m, l_sum = _empty_partials(q, num_splits)
    _partials_kernel[(b * num_kv, num_splits)](
        q,
        k,
        v,
        start,
        end,
        table,
        o,
        m,
        l_sum,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        *k_strides,
        *v_strides,
        table.stride(0),
        scale,
        softcap,
        NUM_KV=num_kv,
        G=groups,
        G_PAD=max(16, triton.next_power_of_2(groups)),
        D=dim,
        BLOCK=BLOCK_N,
        SPLIT=math.ceil(max_len / num_splits / BLOCK_N) * BLOCK_N,
        NUM_SPLITS=num_splits,
        IEEE=q.dtype == torch.float32,
        SOFTCAP=softcap > 0,
        PAGED=block_size > 0,
        BS=max(block_size, 1),
    )
    return o, m, l_sum


def _empty_partials(
    q: torch.Tensor, num_splits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The partial results' buffers: output [B, KV, G, S, D], max and sum [B, KV, G, S]."""
    b, num_kv, groups, dim = q.shape
    o = q.new_empty(b, num_kv, groups, num_splits, dim, dtype=torch.float32)
    m = q.new_empty(b, num_kv, groups, num_splits, dtype=torch.float32)
    return o, m, torch.empty_like(m)


@torch.library.custom_op("chatqueue::decode_attention_partials", mutates_args=())
def decode_attention_partials(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    start: torch.Tensor,
    col: torch.Tensor,
    scale: float,
    num_splits: int,
    softcap: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per split: the unnormalised output [B, KV, G, S, D], running max and sum [B, KV, G, S]."""
    return _partials(
        q,
        k,
        v,
        start=start,
        end=col,
        table=start,  # no block table
        k_strides=(k.stride(0), k.stride(1), k.stride(2)),
        v_strides=(v.stride(0), v.stride(1), v.stride(2)),
        max_len=k.shape[2],
        scale=scale,
        num_splits=num_splits,
        softcap=softcap,
        block_size=0,
    )


@decode_attention_partials.register_fake
def _(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    start: torch.Tensor,
    col: torch.Tensor,
    scale: float,
    num_splits: int,
    softcap: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _empty_partials(q, num_splits)


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    start: torch.Tensor,
    col: torch.Tensor,
    scale: float,
    num_splits: int,
    softcap: float = 0.0,
) -> torch.Tensor:
    """q [B, KV, G, D] (query heads grouped by their KV head); k, v [B, KV, L, D]; row r attends
    to columns start[r] ..= col[0]. `softcap` > 0: scores soft-capped with tanh (Gemma2).
    Returns [B, KV, G, D] in q's dtype."""
    o, m, l_sum = decode_attention_partials(q, k, v, start, col, scale, num_splits, softcap)
    return _merge(o, m, l_sum, q.dtype)


def _merge(
    o: torch.Tensor, m: torch.Tensor, l_sum: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """The splits' partial results weighed by their log-sum-exp (Inductor fuses these ops)."""
    weight = torch.exp(m - m.amax(dim=-1, keepdim=True))  # empty splits: exp(-inf) = 0
    out: torch.Tensor = (o * weight.unsqueeze(-1)).sum(dim=-2) / (l_sum * weight).sum(
        dim=-1, keepdim=True
    )
    return out.to(dtype)


@torch.library.custom_op("chatqueue::paged_decode_attention_partials", mutates_args=())
def paged_decode_attention_partials(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    table: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    scale: float,
    num_splits: int,
    softcap: float,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As `decode_attention_partials`, over a paged pool: k, v [KV, slots, D] (one layer's);
    table [B, blocks a row] of block ids; row r reads its positions [start[r], end[r])."""
    return _partials(
        q,
        k,
        v,
        start=start,
        end=end,
        table=table,
        k_strides=(0, k.stride(0), k.stride(1)),
        v_strides=(0, v.stride(0), v.stride(1)),
        max_len=table.shape[1] * block_size,
        scale=scale,
        num_splits=num_splits,
        softcap=softcap,
        block_size=block_size,
    )


@paged_decode_attention_partials.register_fake
def _(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    table: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    scale: float,
    num_splits: int,
    softcap: float,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _empty_partials(q, num_splits)


def paged_decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    table: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    block_size: int,
    scale: float,
    num_splits: int,
    softcap: float = 0.0,
) -> torch.Tensor:
    """q [B, KV, G, D]; k, v [KV, slots, D], a layer of the paged pool; table [B, n] each row's
    blocks; row r attends to its positions start[r] .. end[r] - 1. Returns [B, KV, G, D]."""
    o, m, l_sum = paged_decode_attention_partials(
        q, k, v, table, start, end, scale, num_splits, softcap, block_size
    )
    return _merge(o, m, l_sum, q.dtype)

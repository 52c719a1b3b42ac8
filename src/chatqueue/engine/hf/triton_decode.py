"""Decode attention on the GPU over only the positions each row holds (a Triton kernel).

The static cache gives every row one run of columns [start, col]; SDPA with a mask reads all
`max_len` columns of every row and throws most away. This kernel reads [start, col] alone, in
splits (flash-decoding) so that a small batch still fills the GPU: each program owns one (row,
KV head) and one split of the columns, and answers for that KV head's whole group of query heads
at once, so each K/V element is read once per step. Where there are rows enough to fill the GPU
there is one split, and the kernel writes the output itself; else the splits' partial results
are merged with their log-sum-exp weights by a second kernel. The step's new key and value are
written into the cache by the kernel that attends to them (one launch a layer, not three).
A sliding-window layer's rows are rings of W columns (`static/slots.py`): column c at c % W.

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
    lowest,  # WINDOWED: each query row's first position in its window
    ring,  # RING: the columns a row's ring holds
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
    RING: tl.constexpr,
    WINDOWED: tl.constexpr = False,
):
    """Positions [n0, n0 + BLOCK) below `hi` into the query rows' running softmax (max `m_i`, sum
    `l_i`, unnormalised output `acc`): their keys and values read at `k_base`, `v_base` (through
    `table_row` where PAGED, at column position % `ring` where RING), scores scaled (and
    soft-capped), a position past a row's own unseen where CAUSAL (and one before its `lowest`
    where WINDOWED: a row may then see none of a block's positions, its maximum still -inf).
    Returns the new (m_i, l_i, acc). Shared by this module's kernel and the packed one
    (`triton_packed.py`)."""
    offs_n = n0 + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D)
    in_run = offs_n < hi
    if PAGED:
        block = tl.load(table_row + offs_n // BS, mask=in_run, other=0)
        where = block.to(tl.int64) * BS + offs_n % BS
    elif RING:
        where = offs_n % ring
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
    if WINDOWED:
        seen = seen & (offs_n[None, :] >= lowest[:, None])
    s = tl.where(seen, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = m_new
    if WINDOWED:  # a row that has seen nothing yet: exp(-inf - -inf) would be NaN
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_use[:, None])
    alpha = tl.exp(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit  # type: ignore[untyped-decorator]
def _decode_kernel(  # type: ignore[no-untyped-def]  # Triton pointers and constexprs
    q_ptr,
    k_ptr,
    v_ptr,
    kn_ptr,  # the step's new keys [B, KV, D] (row and head strides below)
    vn_ptr,  # the step's new values [B, KV, D], with strides of their own
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
    stride_nb,
    stride_nh,
    stride_nvb,
    stride_nvh,
    stride_tb,
    ring,  # RING: the columns each row's ring holds (a sliding-window layer's)
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
    RING: tl.constexpr,  # static: the layer's rows are rings of `ring` columns
):
    """Program (row b and KV head h, split): the group's query heads over the row's positions
    in [start, end) that fall in the split. The row's last position is this step's token, whose
    key and value come from `kn_ptr`, `vn_ptr`: the split that holds it writes
    them into the cache and attends to them from registers (no other program reads that
    position). NUM_SPLITS == 1: the output itself, normalised, in o's dtype; else each split's
    unnormalised output, max and sum, merged by `_merge_kernel`."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // NUM_KV
    h = pid % NUM_KV
    if PAGED:
        end = tl.load(col_ptr + b)
        k_base = k_ptr + h * stride_kh  # the pool: [kv_heads, slots, head_dim] a layer
        v_base = v_ptr + h * stride_vh
    else:
        end = tl.load(col_ptr) + 1
        k_base = k_ptr + b * stride_kb + h * stride_kh
        v_base = v_ptr + b * stride_vb + h * stride_vh
    # the splits cover [base, base + the columns a row holds): a ring's last `ring` positions
    base = 0
    if RING:
        base = end - ring
    lo = tl.maximum(tl.load(start_ptr + b), base + split * SPLIT)
    hi = tl.minimum(end, base + (split + 1) * SPLIT)
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
    last = end - 1
    cached_hi = tl.minimum(hi, last)  # the last position is read from registers, below
    for n0 in range(lo, cached_hi, BLOCK):
        m_i, l_i, acc = attend_block(
            q,
            m_i,
            l_i,
            acc,
            k_base,
            v_base,
            table_ptr + b * stride_tb,
            n0,
            cached_hi,
            offs_g,  # position: unread (not CAUSAL)
            offs_g,  # lowest: unread (not WINDOWED)
            ring,
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
            RING=RING,
        )
    if (last >= lo) & (last < hi):
        k_new = tl.load(kn_ptr + b * stride_nb + h * stride_nh + offs_d)
        v_new = tl.load(vn_ptr + b * stride_nvb + h * stride_nvh + offs_d)
        if PAGED:
            block = tl.load(table_ptr + b * stride_tb + last // BS)
            where = block.to(tl.int64) * BS + last % BS
        elif RING:
            where = (last % ring).to(tl.int64)
        else:
            where = last.to(tl.int64)
        tl.store(k_base + where * stride_kn + offs_d, k_new)
        tl.store(v_base + where * stride_vn + offs_d, v_new)
        s = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * scale
        if SOFTCAP:
            s = softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0)
        m_new = tl.maximum(m_i, s)
        p = tl.exp(s - m_new)
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + p
        acc = acc * alpha[:, None] + p[:, None] * v_new.to(tl.float32)[None, :]
        m_i = m_new
    if NUM_SPLITS == 1:
        out = acc / l_i[:, None]
        rows = pid * G + offs_g  # in [B * NUM_KV * G]
        tl.store(
            o_ptr + rows[:, None] * D + offs_d[None, :],
            out.to(o_ptr.dtype.element_ty),
            mask=is_head[:, None],
        )
    else:
        row = (pid * G + offs_g) * NUM_SPLITS + split  # in [B * NUM_KV * G, NUM_SPLITS]
        tl.store(m_ptr + row, m_i, mask=is_head)
        tl.store(l_ptr + row, l_i, mask=is_head)
        tl.store(o_ptr + row[:, None] * D + offs_d[None, :], acc, mask=is_head[:, None])


@triton.jit  # type: ignore[untyped-decorator]
def _merge_kernel(  # type: ignore[no-untyped-def]  # Triton pointers and constexprs
    o_ptr,
    m_ptr,
    l_ptr,
    out_ptr,
    S: tl.constexpr,
    S_PAD: tl.constexpr,
    D: tl.constexpr,
):
    """One query head of one row: its splits' partial outputs weighed by their log-sum-exp."""
    row = tl.program_id(0)
    offs_s = tl.arange(0, S_PAD)
    offs_d = tl.arange(0, D)
    is_split = offs_s < S
    m = tl.load(m_ptr + row * S + offs_s, mask=is_split, other=float("-inf"))
    l_sum = tl.load(l_ptr + row * S + offs_s, mask=is_split, other=0.0)
    o = tl.load(
        o_ptr + (row * S + offs_s)[:, None] * D + offs_d[None, :],
        mask=is_split[:, None],
        other=0.0,
    )
    weight = tl.exp(m - tl.max(m, 0))  # an empty split: exp(-inf) = 0
    out = tl.sum(o * weight[:, None], 0) / tl.sum(l_sum * weight, 0)
    tl.store(out_ptr + row * D + offs_d, out.to(out_ptr.dtype.element_ty))


_SMS: dict[int, int] = {}


def splits_for(rows: int, num_kv: int, max_len: int, device: torch.device) -> int:
    """How many splits of the columns: enough (row, KV head, split) programs to fill the GPU's
    multiprocessors twice over, at most one a 256 columns (at 64 rows of 8 KV heads: one,
    and no merge)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    wanted = -(-2 * _SMS[index] // max(1, rows * num_kv))
    return max(1, min(-(-max_len // 256), wanted))


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    *,
    start: torch.Tensor,
    end: torch.Tensor,
    table: torch.Tensor,
    k_strides: tuple[int, int, int],
    v_strides: tuple[int, int, int],
    max_len: int,
    scale: float,
    softcap: float,
    block_size: int,
    ring: bool = False,
) -> torch.Tensor:
    """Launch the kernel (and the merge, for more than one split, as `splits_for` the rows and
    `max_len` columns a row may hold): `k_strides`, `v_strides`
    (row, head, position); `block_size` > 0 reads through `table` (paged), else `end` is the
    static cache's one last column (`ring`: each row a ring of `max_len` columns, its column c
    at c % max_len). `k_new`, `v_new` [B, KV, D] (last dim contiguous): this
    step's KV, written at each row's last position and attended from registers. Returns
    [B, KV, G, D] in q's dtype."""
    b, num_kv, groups, dim = q.shape
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
    num_splits = splits_for(b, num_kv, max_len, q.device)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if num_splits == 1:
        o, m, l_sum = out, out, out  # m and l unused
    else:
        o, m, l_sum = _empty_partials(q, num_splits)
    assert k_new.stride(-1) == 1 and v_new.stride(-1) == 1
    _decode_kernel[(b * num_kv, num_splits)](
        q,
        k,
        v,
        k_new,
        v_new,
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
        k_new.stride(0),
        k_new.stride(1),
        v_new.stride(0),
        v_new.stride(1),
        table.stride(0),
        max_len,
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
        RING=ring,
    )
    if num_splits > 1:
        _merge_kernel[(b * num_kv * groups,)](
            o, m, l_sum, out, S=num_splits, S_PAD=triton.next_power_of_2(num_splits), D=dim
        )
    return out


def _empty_partials(
    q: torch.Tensor, num_splits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The partial results' buffers: output [B, KV, G, S, D], max and sum [B, KV, G, S]."""
    b, num_kv, groups, dim = q.shape
    o = q.new_empty(b, num_kv, groups, num_splits, dim, dtype=torch.float32)
    m = q.new_empty(b, num_kv, groups, num_splits, dtype=torch.float32)
    return o, m, torch.empty_like(m)


def _new_kv(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A step's new k, v [B, KV, 1, D] as [B, KV, D], each with its last dim dense.

    NOTE: each keeps its own layout (the key is Inductor's output after RoPE, the value a view
    of the q/k/v projection's): made alike, the value cost a copy kernel a layer."""
    k, v = k[:, :, 0], v[:, :, 0]
    return (k if k.stride(-1) == 1 else k.contiguous()), (
        v if v.stride(-1) == 1 else v.contiguous()
    )


@torch.library.custom_op("chatqueue::decode_attention", mutates_args=("k_cache", "v_cache"))
def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    start: torch.Tensor,
    col: torch.Tensor,
    scale: float,
    softcap: float,
    ring: bool,
) -> torch.Tensor:
    """The static cache's decode attention, its KV write included: rows [0, B)'s new k, v
    [B, KV, 1, D] go into column col[0] of the whole caches [rows, KV, L, D]; q [B, KV, G, D]
    (query heads grouped by their KV head) attends to columns start[r] ..= col[0] of row r.
    `ring`: a sliding-window layer's caches, whose rows hold their last L columns, column c at
    c % L (start[r] > col[0] - L). `softcap` > 0: scores soft-capped with tanh (Gemma2).
    Returns [B, KV, G, D] in q's dtype.

    NOTE: an op that names the whole cache buffers it mutates (written on a slice, Inductor
    copied both whole buffers every step: 1.8 of 3.4 ms a step at batch 64 on an H200)."""
    k_new, v_new = _new_kv(k, v)
    max_len = k_cache.shape[2]
    return _attend(
        q,
        k_cache,
        v_cache,
        k_new,
        v_new,
        start=start,
        end=col,
        table=start,  # no block table
        k_strides=(k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)),
        v_strides=(v_cache.stride(0), v_cache.stride(1), v_cache.stride(2)),
        max_len=max_len,
        scale=scale,
        softcap=softcap,
        block_size=0,
        ring=ring,
    )


@decode_attention.register_fake
def _(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    start: torch.Tensor,
    col: torch.Tensor,
    scale: float,
    softcap: float,
    ring: bool,
) -> torch.Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.custom_op("chatqueue::paged_decode_attention", mutates_args=("k_pool", "v_pool"))
def paged_decode_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    table: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    scale: float,
    softcap: float,
    block_size: int,
) -> torch.Tensor:
    """As `decode_attention`, over a layer of the paged pool [KV, slots, D]: row r's new k, v go
    to its position end[r] - 1 (through its block table, table [B, blocks a row]) and it
    attends to its positions start[r] .. end[r] - 1. Returns [B, KV, G, D]."""
    k_new, v_new = _new_kv(k, v)
    max_len = table.shape[1] * block_size
    return _attend(
        q,
        k_pool,
        v_pool,
        k_new,
        v_new,
        start=start,
        end=end,
        table=table,
        k_strides=(0, k_pool.stride(0), k_pool.stride(1)),
        v_strides=(0, v_pool.stride(0), v_pool.stride(1)),
        max_len=max_len,
        scale=scale,
        softcap=softcap,
        block_size=block_size,
    )


@paged_decode_attention.register_fake
def _(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    table: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    scale: float,
    softcap: float,
    block_size: int,
) -> torch.Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)

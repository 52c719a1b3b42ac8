"""Attention of a packed step on the GPU: prompt chunks and decode rows together, each query token
over its own sequence's positions in the paged pool, causal (a Triton kernel, flash attention
reading keys through block tables).

A packed step lays its tokens out in one run: each decode row's next token, then each prompt
chunk's tokens. The run is cut into tiles, each up to `tokens_a_tile` consecutive tokens of one
sequence (consecutive positions; a decode row is a tile of one). A program owns one tile and one
KV head: it loads the tile's queries of that head's whole group of query heads at once (rows
`token * G_PAD + head`), then walks the sequence's keys up to the tile's last position through
its block table, each key read once for the whole tile and group, with a running softmax. Query
i of a tile sees the keys at positions <= its own: the prefix cached or run before, and this
step's own tokens (written to the pool before the kernel runs).

Only imported where Triton and CUDA exist; `packed_attention` is a custom op, so Inductor treats
it as one opaque kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 64  # keys per inner iteration
ROWS = 64  # query rows a program holds: tokens a tile * the group's heads (padded)


def tokens_a_tile(group: int) -> int:
    """How many query tokens one tile holds for `group` query heads a KV head."""
    return max(1, ROWS // int(triton.next_power_of_2(group)))


@triton.jit  # type: ignore[untyped-decorator]
def _packed_kernel(  # type: ignore[no-untyped-def]  # Triton pointers and constexprs
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    tiles_ptr,  # [S, 3]: the tile's first token in the run, its number of tokens, its table row
    end_ptr,  # [S]: the tile's last position + 1 (the keys its last token sees)
    table_ptr,  # [R, W]: block tables, one row a sequence
    stride_qt,
    stride_qh,
    stride_qg,
    stride_ot,
    stride_oh,
    stride_og,
    stride_kh,
    stride_kn,
    stride_vh,
    stride_vn,
    stride_tr,
    scale,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    TOKENS: tl.constexpr,
    D: tl.constexpr,
    BLOCK: tl.constexpr,
    BS: tl.constexpr,
    IEEE: tl.constexpr,
):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    first = tl.load(tiles_ptr + tile * 3)
    count = tl.load(tiles_ptr + tile * 3 + 1)
    row = tl.load(tiles_ptr + tile * 3 + 2)
    end = tl.load(end_ptr + tile)
    offs_r = tl.arange(0, TOKENS * G_PAD)
    tok = offs_r // G_PAD
    g = offs_r % G_PAD
    valid = (tok < count) & (g < G)
    offs_d = tl.arange(0, D)
    q_rows = (first + tok).to(tl.int64) * stride_qt + h * stride_qh + g * stride_qg
    q = tl.load(q_ptr + q_rows[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
    position = end - count + tok  # of each query row's token
    k_base = k_ptr + h * stride_kh  # the pool: [kv_heads, slots, head_dim] a layer
    v_base = v_ptr + h * stride_vh
    m_i = tl.full([TOKENS * G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([TOKENS * G_PAD], tl.float32)
    acc = tl.zeros([TOKENS * G_PAD, D], tl.float32)
    for n0 in range(0, end, BLOCK):
        offs_n = n0 + tl.arange(0, BLOCK)
        in_run = offs_n < end
        block = tl.load(table_ptr + row * stride_tr + offs_n // BS, mask=in_run, other=0)
        where = block.to(tl.int64) * BS + offs_n % BS
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
        # key 0 is in every row's first iteration: each row's maximum is finite from there on
        seen = in_run[None, :] & (offs_n[None, :] <= position[:, None])
        s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / l_i[:, None]
    o_rows = (first + tok).to(tl.int64) * stride_ot + h * stride_oh + g * stride_og
    tl.store(
        o_ptr + o_rows[:, None] + offs_d[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=valid[:, None],
    )


@torch.library.custom_op("chatqueue::packed_attention", mutates_args=())
def packed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tiles: torch.Tensor,
    end: torch.Tensor,
    table: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """q [T, KV, G, D] (a packed step's tokens, query heads grouped by their KV head); k, v
    [KV, slots, D], one layer of the pool, holding every token's key and value already; tiles
    [S, 3] (first token, tokens, table row), end [S], table [R, W] (see the module). Returns
    [T, KV, G, D] in q's dtype."""
    _, num_kv, groups, dim = q.shape
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
    out = torch.empty_like(q)
    _packed_kernel[(tiles.shape[0], num_kv)](
        q,
        k,
        v,
        out,
        tiles,
        end,
        table,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        table.stride(0),
        scale,
        G=groups,
        G_PAD=triton.next_power_of_2(groups),
        TOKENS=tokens_a_tile(groups),
        D=dim,
        BLOCK=BLOCK_N,
        BS=block_size,
        IEEE=q.dtype == torch.float32,
    )
    return out


@packed_attention.register_fake
def _(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tiles: torch.Tensor,
    end: torch.Tensor,
    table: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    return torch.empty_like(q)

"""Attention of a packed step on the GPU: prompt chunks and decode rows together, each query token
over its own sequence's positions in the paged pool, causal (a Triton kernel, flash attention
reading keys through block tables).

A packed step lays its tokens out in one run: each decode row's next token, then each prompt
chunk's tokens. The run is cut into tiles, each up to `tokens_a_tile` consecutive tokens of one
sequence (consecutive positions; a decode row is a tile of one). A program owns one tile and one
KV head: it loads the tile's queries of that head's whole group of query heads at once (rows
`token * G_PAD + head`), then walks the sequence's keys up to the tile's last position through
its block table, each key read once for the whole tile and group, with a running softmax (the
decode kernel's `attend_block`). Query i of a tile sees the keys at positions <= its own: the
prefix cached or run before, and this step's own tokens (written to the pool before the kernel
runs). In a sliding-window layer it sees only the last W of them; Gemma 2's scores are
soft-capped.

Only imported where Triton and CUDA exist; `packed_attention` is a custom op, so Inductor treats
it as one opaque kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from chatqueue.engine.hf.triton_decode import attend_block

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
    softcap,
    window,  # WINDOWED: a query sees its last `window` positions, its own included
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    TOKENS: tl.constexpr,
    D: tl.constexpr,
    BLOCK: tl.constexpr,
    BS: tl.constexpr,
    IEEE: tl.constexpr,
    SOFTCAP: tl.constexpr,
    WINDOWED: tl.constexpr,
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
    lowest = position - window + 1  # WINDOWED: each query row's first position seen
    first_key = 0
    if WINDOWED:  # the tile's first query sees nothing before its window
        first_key = tl.maximum(end - count - window + 1, 0)
    k_base = k_ptr + h * stride_kh  # the pool: [kv_heads, slots, head_dim] a layer
    v_base = v_ptr + h * stride_vh
    m_i = tl.full([TOKENS * G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([TOKENS * G_PAD], tl.float32)
    acc = tl.zeros([TOKENS * G_PAD, D], tl.float32)
    for n0 in range(first_key, end, BLOCK):
        # without a window, key 0 is in every row's first block: each row's maximum is finite
        # from there on; with one, `attend_block` takes a row that has seen nothing yet
        m_i, l_i, acc = attend_block(
            q,
            m_i,
            l_i,
            acc,
            k_base,
            v_base,
            table_ptr + row * stride_tr,
            n0,
            end,
            position,
            lowest,
            0,
            stride_kn,
            stride_vn,
            scale,
            softcap,
            D=D,
            BLOCK=BLOCK,
            PAGED=True,
            BS=BS,
            IEEE=IEEE,
            SOFTCAP=SOFTCAP,
            CAUSAL=True,
            RING=False,
            WINDOWED=WINDOWED,
        )
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
    softcap: float,
    window: int,
) -> torch.Tensor:
    """q [T, KV, G, D] (a packed step's tokens, query heads grouped by their KV head); k, v
    [KV, slots, D], one layer of the pool, holding every token's key and value already; tiles
    [S, 3] (first token, tokens, table row), end [S], table [R, W] (see the module).
    `softcap` > 0: scores soft-capped with tanh (Gemma2); `window` > 0: a sliding-window
    layer's, each query seeing its last `window` positions. Returns [T, KV, G, D] in q's
    dtype."""
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
        softcap,
        window,
        G=groups,
        G_PAD=triton.next_power_of_2(groups),
        TOKENS=tokens_a_tile(groups),
        D=dim,
        BLOCK=BLOCK_N,
        BS=block_size,
        IEEE=q.dtype == torch.float32,
        SOFTCAP=softcap > 0,
        WINDOWED=window > 0,
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
    softcap: float,
    window: int,
) -> torch.Tensor:
    return torch.empty_like(q)

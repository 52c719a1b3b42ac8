"""The packed attention kernel's contract (`engine/hf/triton_packed.py`) in plain torch, so that a
CPU test drives the paged runner's packed steps through tiles, table rows and ends as the GPU
does: each tile of `tokens_a_tile` tokens of one sequence reads that sequence's keys through its
table row, causal by position (within its window, soft-capped, where the layer says). Tiles are
kept small (3 tokens) so that chunks span several."""

from __future__ import annotations

import torch


def tokens_a_tile(group: int) -> int:
    return 3


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
    """q [T, KV, G, D]; k, v [KV, slots, D]; tiles [S, 3] (first, count, row); end [S];
    `softcap` > 0: tanh soft-capping; `window` > 0: each query's last `window` positions. A
    token no tile covers stays NaN, so that a tile missed shows in the output."""
    out = torch.full_like(q, float("nan"))
    for (first, count, row), stop in zip(tiles.tolist(), end.tolist(), strict=True):
        if count == 0:  # padding
            continue
        positions = torch.arange(stop)
        slots = table[row].long()[positions // block_size] * block_size + positions % block_size
        keys, values = k[:, slots], v[:, slots]  # [KV, stop, D]
        queries = q[first : first + count]  # [n, KV, G, D]
        scores = torch.einsum("nkgd,ksd->nkgs", queries, keys) * scale
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        own = torch.arange(stop - count, stop)  # the tile's tokens' positions
        hidden = positions[None, None, None, :] > own[:, None, None, None]
        if window:
            hidden |= positions[None, None, None, :] <= own[:, None, None, None] - window
        weights = scores.masked_fill(hidden, float("-inf")).softmax(-1)
        out[first : first + count] = torch.einsum("nkgs,ksd->nkgd", weights, values)
    return out

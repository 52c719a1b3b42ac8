"""Attention through block tables, registered with transformers as `chatqueue_paged`.

NOTE: how a step runs. The step's tokens are packed into one row (batch 1): first the decode rows'
pending tokens, one each, then each prefill chunk's tokens; every token carries its own position,
so RoPE is right. The model's own layers run unchanged; in each attention layer this function
writes the step's new keys and values into the pool at their slots, then attends:
- decode rows together: each row's blocks are gathered ([rows, kv_heads, tokens, head_dim], short
  rows padded with the zero block) and one SDPA call reads them under a length mask;
- each prefill chunk alone: over its blocks so far (a cached prefix, earlier chunks, this chunk),
  causal with the chunk's offset; a chunk with nothing before it attends to its own keys.
The model is given no cache and no mask (transformers builds none for an implementation it does
not know), so nothing is computed twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from chatqueue.engine.hf.paged.pool import KVPool

NAME = "chatqueue_paged"
STEP_KWARG = "chatqueue_step"


@dataclass(frozen=True, slots=True)
class PrefillChunk:
    start: int  # where its tokens sit in the packed row
    end: int
    num_before: int  # tokens of the sequence whose KV was in the pool before this chunk
    blocks: torch.Tensor  # [n] the blocks that hold its tokens up to the chunk's end
    # [tokens, num_before + tokens] True: a key the query sees (None: nothing before, causal);
    # made once a step, not in every layer
    seen: torch.Tensor | None = None


@dataclass(slots=True)
class PagedStep:
    pool: KVPool
    slots: torch.Tensor  # [tokens] where each packed token's key and value go
    num_decode: int = 0
    decode_blocks: torch.Tensor | None = None  # [rows * n] each row's blocks, padded
    decode_mask: torch.Tensor | None = None  # [rows, 1, 1, n * block_size] True: a key to read
    prefills: list[PrefillChunk] = field(default_factory=list)
    num_layers_seen: int = 0  # attention calls this step: every layer's, or the model is not ours


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query [1, heads, tokens, dim]; key, value [1, kv_heads, tokens, dim] (the step's new
    tokens). Returns [1, tokens, heads, dim], as transformers' attention functions do."""
    step: PagedStep = kwargs[STEP_KWARG]
    layer = int(module.layer_idx)  # type: ignore[arg-type]
    step.num_layers_seen += 1
    step.pool.write(layer, step.slots, key[0], value[0])
    out = query.new_empty(query.shape[0], query.shape[2], query.shape[1], query.shape[3])
    if step.num_decode:
        out[0, : step.num_decode] = _decode(step, layer, query, scaling)
    for chunk in step.prefills:
        out[0, chunk.start : chunk.end] = _prefill(step, layer, chunk, query, key, value, scaling)
    return out, None


def _decode(
    step: PagedStep, layer: int, query: torch.Tensor, scaling: float | None
) -> torch.Tensor:
    """Every decode row at once. NOTE: a row's query heads are viewed as [kv_heads, group]
    (query head h reads KV head h // group), so SDPA reads each KV head once for its group with
    no repeat and no GQA expansion: the fastest of the variants measured on a CPU
    (benchmarks/RESULTS.md)."""
    rows = step.num_decode
    assert step.decode_blocks is not None
    keys, values = step.pool.gather(layer, step.decode_blocks, rows)
    heads, dim = query.shape[1], query.shape[3]
    q = query[0, :, :rows].transpose(0, 1).reshape(rows, keys.shape[1], -1, dim)
    attended = F.scaled_dot_product_attention(
        q, keys, values, attn_mask=step.decode_mask, scale=scaling
    )
    return attended.reshape(rows, heads, dim)


def _prefill(
    step: PagedStep,
    layer: int,
    chunk: PrefillChunk,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float | None,
) -> torch.Tensor:
    q = query[:, :, chunk.start : chunk.end]  # [1, heads, n, dim]
    n = chunk.end - chunk.start
    if chunk.num_before == 0:
        keys, values = key[:, :, chunk.start : chunk.end], value[:, :, chunk.start : chunk.end]
        attended = F.scaled_dot_product_attention(
            q, keys, values, is_causal=True, scale=scaling, enable_gqa=True
        )
    else:
        total = chunk.num_before + n
        keys, values = step.pool.gather(layer, chunk.blocks, 1)
        keys, values = keys[:, :, :total], values[:, :, :total]
        seen = chunk.seen if chunk.seen is not None else causal_after(chunk.num_before, n, q.device)
        attended = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=seen, scale=scaling, enable_gqa=True
        )
    return attended[0].transpose(0, 1)  # [n, heads, dim]


def causal_after(num_before: int, n: int, device: torch.device) -> torch.Tensor:
    """[n, num_before + n]: query i sees every key before it and itself."""
    total = num_before + n
    return torch.arange(total, device=device).unsqueeze(0) <= (
        torch.arange(n, device=device).unsqueeze(1) + num_before
    )


AttentionInterface.register(NAME, paged_attention)

"""Attention through block tables, registered with transformers as `chatqueue_paged`.

NOTE: how a step runs. The step's tokens are packed into one row (batch 1): first the decode rows'
pending tokens, one each, then each prefill chunk's tokens; every token carries its own position,
so RoPE is right. The model's own layers run unchanged; in each attention layer this function
writes the step's new keys and values into the pool at their slots, then attends:
- decode rows together: each row's blocks are gathered ([rows, kv_heads, tokens, head_dim], short
  rows padded with the zero block) and one SDPA call reads them under a length mask;
- each prefill chunk alone: over its blocks so far (a cached prefix, earlier chunks, this chunk),
  causal with the chunk's offset; a chunk with nothing before it attends to its own keys.
A sliding-window layer (transformers passes the layer's `sliding_window`) sees a query's last W
positions only, its own included (`key > query - W`, as transformers' mask); soft-capped scores
(Gemma 2's `softcap`) go through transformers' eager ops instead of SDPA, which cannot cap.
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
    decode_lengths: torch.Tensor | None = None  # [rows] each row's positions, the pending one too
    windowed_masks: dict[int, torch.Tensor] = field(default_factory=dict)  # decode_mask for a W
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
    window: int | None = kwargs.get("sliding_window")
    softcap: float | None = kwargs.get("softcap")
    step.num_layers_seen += 1
    step.pool.write(layer, step.slots, key[0], value[0])
    out = query.new_empty(query.shape[0], query.shape[2], query.shape[1], query.shape[3])
    if step.num_decode:
        out[0, : step.num_decode] = _decode(step, layer, query, scaling, window, softcap)
    for chunk in step.prefills:
        out[0, chunk.start : chunk.end] = _prefill(
            step, layer, chunk, query, key, value, scaling, window, softcap
        )
    return out, None


def _decode(
    step: PagedStep,
    layer: int,
    query: torch.Tensor,
    scaling: float | None,
    window: int | None,
    softcap: float | None,
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
    mask = step.decode_mask if window is None else _windowed_decode_mask(step, window)
    attended = _attend(q, keys, values, mask, scaling, softcap)
    return attended.reshape(rows, heads, dim)


def _windowed_decode_mask(step: PagedStep, window: int) -> torch.Tensor:
    """The decode rows' mask for a sliding-window layer: each row's last W positions (made once
    a step for each W, shared by its layers)."""
    if window not in step.windowed_masks:
        assert step.decode_mask is not None and step.decode_lengths is not None
        columns = torch.arange(step.decode_mask.shape[-1], device=step.decode_mask.device)
        query = (step.decode_lengths - 1).view(-1, 1, 1, 1)  # the pending token's position
        step.windowed_masks[window] = step.decode_mask & (columns > query - window)
    return step.windowed_masks[window]


def _prefill(
    step: PagedStep,
    layer: int,
    chunk: PrefillChunk,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float | None,
    window: int | None,
    softcap: float | None,
) -> torch.Tensor:
    q = query[:, :, chunk.start : chunk.end]  # [1, heads, n, dim]
    n = chunk.end - chunk.start
    if chunk.num_before == 0 and window is None and not softcap:
        keys, values = key[:, :, chunk.start : chunk.end], value[:, :, chunk.start : chunk.end]
        attended = F.scaled_dot_product_attention(
            q, keys, values, is_causal=True, scale=scaling, enable_gqa=True
        )
        return attended[0].transpose(0, 1)  # [n, heads, dim]
    if chunk.num_before == 0:
        keys, values = key[:, :, chunk.start : chunk.end], value[:, :, chunk.start : chunk.end]
    else:
        keys, values = step.pool.gather(layer, chunk.blocks, 1)
        keys, values = keys[:, :, : chunk.num_before + n], values[:, :, : chunk.num_before + n]
    seen = chunk.seen if chunk.seen is not None else causal_after(chunk.num_before, n, q.device)
    if window is not None:  # key k (position k) seen by query i (position num_before + i)
        seen = seen & (
            torch.arange(seen.shape[1], device=q.device).unsqueeze(0)
            > torch.arange(n, device=q.device).unsqueeze(1) + chunk.num_before - window
        )
    if not softcap:
        attended = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=seen, scale=scaling, enable_gqa=True
        )
        return attended[0].transpose(0, 1)  # [n, heads, dim]
    # NOTE: the query's heads grouped by their KV head, as in _decode: no GQA expansion
    kv_heads, dim = keys.shape[1], q.shape[3]
    grouped = q[0].reshape(kv_heads, -1, n, dim).reshape(kv_heads, -1, dim)  # [KV, G * n, D]
    mask = seen.repeat(q.shape[1] // kv_heads, 1)  # [G * n, total]
    attended = _attend(grouped, keys[0], values[0], mask, scaling, softcap)
    return attended.view(q.shape[1], n, dim).transpose(0, 1)  # [n, heads, dim]


def _attend(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float | None,
    softcap: float | None,
) -> torch.Tensor:
    """q over keys and values (the same leading dims) under a boolean mask (True: seen): SDPA,
    or transformers' eager ops where scores are soft-capped (Gemma 2), op for op."""
    if not softcap:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scaling)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    scores = torch.matmul(q, keys.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, values)


def causal_after(num_before: int, n: int, device: torch.device) -> torch.Tensor:
    """[n, num_before + n]: query i sees every key before it and itself."""
    total = num_before + n
    return torch.arange(total, device=device).unsqueeze(0) <= (
        torch.arange(n, device=device).unsqueeze(1) + num_before
    )


AttentionInterface.register(NAME, paged_attention)

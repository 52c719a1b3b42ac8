"""The running batch's KV cache, right-aligned so every row decodes in the same forward pass.

NOTE: rows hold histories of different lengths in one `DynamicCache`. Every row's newest token sits
in the last column; shorter histories are left-padded, and a 2D attention mask hides the padding.
Each row carries its own position (RoPE sees true positions; the causal mask only needs columns,
which are contiguous within a row since padding is only ever on the left). Joining and leaving copy
the cache (pad + cat, index_select); a decode step only appends one column, like any HF generate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from chatqueue.engine.hf.sampling import SamplingBatch


class UnsupportedCache(RuntimeError):
    """The model's cache is not plain full-attention key/value tensors that can be spliced by row."""


@dataclass(slots=True)
class KVBatch:
    seq_ids: list[int]
    cache: DynamicCache
    attention_mask: torch.Tensor  # [B, width] long, 0 on left padding
    lengths: list[int]  # tokens each row holds in the cache (host copy, so trimming needs no sync)
    positions: torch.Tensor  # [B] long, position of each row's pending token
    pending: torch.Tensor  # [B] long, the last sampled token, not yet in the cache
    sampling: SamplingBatch

    def __len__(self) -> int:
        return len(self.seq_ids)

    @property
    def width(self) -> int:
        return int(self.attention_mask.shape[1])

    def advance(self, tokens: torch.Tensor) -> None:
        """Account for a decode step: the pending tokens entered the cache, `tokens` are next."""
        self.lengths = [n + 1 for n in self.lengths]
        self.positions = self.positions + 1
        self.pending = tokens

    def select(self, rows: Sequence[int]) -> KVBatch:
        """Keep only `rows` (the others left), then drop leading columns that are padding in every row."""
        index = torch.tensor(list(rows), dtype=torch.long, device=self.pending.device)
        lengths = [self.lengths[r] for r in rows]
        start = self.width - max(lengths)
        for layer in _layers(self.cache):
            keys, values = _tensors(layer)
            layer.keys = keys.index_select(0, index)[:, :, start:]
            layer.values = values.index_select(0, index)[:, :, start:]
        return KVBatch(
            seq_ids=[self.seq_ids[r] for r in rows],
            cache=self.cache,
            attention_mask=self.attention_mask.index_select(0, index)[:, start:],
            lengths=lengths,
            positions=self.positions.index_select(0, index),
            pending=self.pending.index_select(0, index),
            sampling=self.sampling.select(rows),
        )

    def concat(self, other: KVBatch) -> KVBatch:
        """These rows followed by `other`'s, both padded on the left to the wider of the two."""
        width = max(self.width, other.width)
        for mine, theirs in zip(_layers(self.cache), _layers(other.cache), strict=True):
            (my_keys, my_values), (their_keys, their_values) = _tensors(mine), _tensors(theirs)
            mine.keys = torch.cat([_left_pad(my_keys, width), _left_pad(their_keys, width)])
            mine.values = torch.cat([_left_pad(my_values, width), _left_pad(their_values, width)])
        mask = [_left_pad(m, width) for m in (self.attention_mask, other.attention_mask)]
        return KVBatch(
            seq_ids=self.seq_ids + other.seq_ids,
            cache=self.cache,
            attention_mask=torch.cat(mask),
            lengths=self.lengths + other.lengths,
            positions=torch.cat([self.positions, other.positions]),
            pending=torch.cat([self.pending, other.pending]),
            sampling=self.sampling.concat(other.sampling),
        )


def check_cache(cache: DynamicCache) -> None:
    """Fail early, with a reason, for caches this batch cannot splice."""
    _layers(cache)


def _layers(cache: DynamicCache) -> list[DynamicLayer]:
    layers: list[DynamicLayer] = []
    for layer in cache.layers:
        # Sliding-window, linear-attention and shared-KV layers keep state that is not one column per
        # token; splicing their tensors by column would be wrong, so refuse rather than guess.
        if type(layer) is not DynamicLayer or layer.keys is None or layer.values is None:
            raise UnsupportedCache(
                f"cache layer {type(layer).__name__} cannot be batched by row; use --batching off"
            )
        layers.append(layer)
    return layers


def _tensors(layer: DynamicLayer) -> tuple[torch.Tensor, torch.Tensor]:
    assert layer.keys is not None and layer.values is not None, "checked by _layers"
    return layer.keys, layer.values


def _left_pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Pad the sequence axis (dim -2 of a KV tensor [B, H, T, D], dim -1 of a mask [B, T]) on the left."""
    if tensor.dim() == 2:
        return F.pad(tensor, (width - tensor.shape[-1], 0))
    return F.pad(tensor, (0, 0, width - tensor.shape[-2], 0))

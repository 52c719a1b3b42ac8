"""The running batch's KV cache, right-aligned so every row decodes in the same forward pass.

NOTE: rows hold histories of different lengths in one `DynamicCache`. Every row's newest token sits
in the last column; shorter histories are left-padded, and a 2D attention mask hides the padding.
Each row carries its own position (RoPE sees true positions; the causal mask only needs columns,
which are contiguous within a row since padding is only ever on the left). Joining and leaving copy
the cache (pad + cat, index_select). A decode step writes one column in place: each layer's keys and
values are views of buffers with spare columns on the right (`GrowingLayer`), where DynamicLayer
would copy the whole layer every step (torch.cat); the attention mask grows the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from chatqueue.engine.hf.sampling import SamplingBatch


class UnsupportedCache(RuntimeError):
    """The model's cache is not plain full-attention key/value tensors that can be spliced by row."""


@dataclass(slots=True)
class KVBatch:
    rids: list[int]
    cache: DynamicCache  # GrowingLayers where rows join and leave (see `make_growing`)
    mask_buffer: torch.Tensor  # [B, capacity] long; the first `width` columns are the mask
    width: int  # columns in use: the longest row's history
    lengths: list[int]  # tokens each row holds in the cache (host copy, so trimming needs no sync)
    positions: torch.Tensor  # [B] long, position of each row's pending token
    pending: torch.Tensor  # [B] long, the last sampled token, not yet in the cache
    sampling: SamplingBatch

    @classmethod
    def create(
        cls,
        *,
        rids: list[int],
        cache: DynamicCache,
        attention_mask: torch.Tensor,
        lengths: list[int],
        pending: torch.Tensor,
        sampling: SamplingBatch,
    ) -> KVBatch:
        return cls(
            rids=rids,
            cache=cache,
            mask_buffer=_with_room(attention_mask, dim=1),
            width=int(attention_mask.shape[1]),
            lengths=lengths,
            positions=torch.tensor(lengths, dtype=torch.long, device=pending.device),
            pending=pending,
            sampling=sampling,
        )

    def __len__(self) -> int:
        return len(self.rids)

    @property
    def attention_mask(self) -> torch.Tensor:
        """[B, width] long, 0 on left padding."""
        return self.mask_buffer[:, : self.width]

    def open_column(self) -> torch.Tensor:
        """The mask for a decode step: one more column, 1 in every row (the pending tokens)."""
        if self.width == self.mask_buffer.shape[1]:
            self.mask_buffer = _with_room(self.attention_mask, dim=1, width=self.width + 1)
        self.mask_buffer[:, self.width] = 1
        self.width += 1
        return self.attention_mask

    def advance(self, tokens: torch.Tensor) -> None:
        """Account for a decode step: the pending tokens entered the cache, `tokens` are next."""
        self.lengths = [n + 1 for n in self.lengths]
        self.positions += 1
        self.pending = tokens

    def select(self, rows: Sequence[int]) -> KVBatch:
        """Keep only `rows` (the others left), then drop leading columns that are padding in every row."""
        index = torch.tensor(list(rows), dtype=torch.long, device=self.pending.device)
        lengths = [self.lengths[r] for r in rows]
        start = self.width - max(lengths)
        for number, layer in enumerate(_layers(self.cache)):
            keys, values = _tensors(layer)
            self.cache.layers[number] = GrowingLayer.holding(
                keys[:, :, start:].index_select(0, index),
                values[:, :, start:].index_select(0, index),
            )
        mask = self.attention_mask[:, start:].index_select(0, index)
        return KVBatch(
            rids=[self.rids[r] for r in rows],
            cache=self.cache,
            mask_buffer=_with_room(mask, dim=1),
            width=int(mask.shape[1]),
            lengths=lengths,
            positions=self.positions.index_select(0, index),
            pending=self.pending.index_select(0, index),
            sampling=self.sampling.select(rows),
        )

    def concat(self, other: KVBatch) -> KVBatch:
        """These rows followed by `other`'s, both padded on the left to the wider of the two."""
        width = max(self.width, other.width)
        for number, (mine, theirs) in enumerate(
            zip(_layers(self.cache), _layers(other.cache), strict=True)
        ):
            (my_keys, my_values), (their_keys, their_values) = _tensors(mine), _tensors(theirs)
            self.cache.layers[number] = GrowingLayer(
                _stack_right_aligned(my_keys, their_keys, width=width, dim=2),
                _stack_right_aligned(my_values, their_values, width=width, dim=2),
                width,
            )
        return KVBatch(
            rids=self.rids + other.rids,
            cache=self.cache,
            mask_buffer=_stack_right_aligned(
                self.attention_mask, other.attention_mask, width=width, dim=1
            ),
            width=width,
            lengths=self.lengths + other.lengths,
            positions=torch.cat([self.positions, other.positions]),
            pending=torch.cat([self.pending, other.pending]),
            sampling=self.sampling.concat(other.sampling),
        )


class GrowingLayer(DynamicLayer):
    """A DynamicLayer whose keys and values [B, H, T, D] are views of buffers with spare columns on
    the right: `update` writes the new columns in place and copies only when the room runs out."""

    def __init__(self, key_buffer: torch.Tensor, value_buffer: torch.Tensor, width: int) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.dtype, self.device = key_buffer.dtype, key_buffer.device
        self.is_initialized = True
        self._key_buffer, self._value_buffer = key_buffer, value_buffer
        self.keys = key_buffer[:, :, :width]
        self.values = value_buffer[:, :, :width]

    @classmethod
    def holding(cls, keys: torch.Tensor, values: torch.Tensor) -> GrowingLayer:
        return cls(_with_room(keys, dim=2), _with_room(values, dim=2), keys.shape[2])

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = _tensors(self)
        if keys.data_ptr() != self._key_buffer.data_ptr():
            # Something outside this module replaced the tensors (HF's crop or reorder helpers).
            self._key_buffer, self._value_buffer = keys, values
        old, new = keys.shape[2], keys.shape[2] + key_states.shape[2]
        if new > self._key_buffer.shape[2]:
            self._key_buffer = _with_room(keys, dim=2, width=new)
            self._value_buffer = _with_room(values, dim=2, width=new)
        self._key_buffer[:, :, old:new] = key_states
        self._value_buffer[:, :, old:new] = value_states
        self.keys = self._key_buffer[:, :, :new]
        self.values = self._value_buffer[:, :, :new]
        return self.keys, self.values


def make_growing(cache: DynamicCache) -> None:
    """Turn a prefilled cache's layers into GrowingLayers, so that rows can join and leave and a
    decode step copies nothing; fail early, with a reason, for caches that cannot be spliced."""
    for index, layer in enumerate(_layers(cache)):
        keys, values = _tensors(layer)
        cache.layers[index] = GrowingLayer.holding(keys, values)


def _layers(cache: DynamicCache) -> list[DynamicLayer]:
    layers: list[DynamicLayer] = []
    for layer in cache.layers:
        # Sliding-window, linear-attention and shared-KV layers keep state that is not one column per
        # token; splicing their tensors by column would be wrong, so refuse rather than guess.
        if (
            not isinstance(layer, DynamicLayer)
            or type(layer) not in (DynamicLayer, GrowingLayer)
            or layer.keys is None
            or layer.values is None
        ):
            raise UnsupportedCache(
                f"cache layer {type(layer).__name__} cannot be batched by row; use --batching off"
            )
        layers.append(layer)
    return layers


def _tensors(layer: DynamicLayer) -> tuple[torch.Tensor, torch.Tensor]:
    assert layer.keys is not None and layer.values is not None, "checked by _layers"
    return layer.keys, layer.values


def _with_room(tensor: torch.Tensor, *, dim: int, width: int | None = None) -> torch.Tensor:
    """A buffer holding `tensor` in its first columns along `dim`, with room to grow to `width`
    and a quarter more (at least 32 columns), so that appending copies only now and then."""
    used = tensor.shape[dim]
    shape = list(tensor.shape)
    shape[dim] = _capacity(max(width or used, used))
    buffer = tensor.new_empty(shape)
    buffer.narrow(dim, 0, used).copy_(tensor)
    return buffer


def _capacity(width: int) -> int:
    return width + max(32, width // 4)


def _stack_right_aligned(
    first: torch.Tensor, second: torch.Tensor, *, width: int, dim: int
) -> torch.Tensor:
    """A buffer (with room, as `_with_room`) holding the rows of `first` then `second`, each
    right-aligned to `width` along `dim`.
    NOTE: the left padding is zeroed, not left as garbage: a masked column still meets a zero
    attention weight, and 0 * NaN would be NaN."""
    shape = list(first.shape)
    shape[0], shape[dim] = first.shape[0] + second.shape[0], _capacity(width)
    buffer = first.new_empty(shape)
    row = 0
    for part in (first, second):
        rows = buffer.narrow(0, row, part.shape[0])
        pad = width - part.shape[dim]
        rows.narrow(dim, 0, pad).zero_()
        rows.narrow(dim, pad, part.shape[dim]).copy_(part)
        row += part.shape[0]
    return buffer

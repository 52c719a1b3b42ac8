"""The static KV cache: fixed-size buffers, one row (slot) per running sequence.

NOTE: how the static cache works. Every running sequence owns one row (slot) of fixed-size KV
buffers [slots, kv_heads, max_len, head_dim] per layer; the running rows are kept packed at the
front (a leaving row is replaced by the last one). All rows write their next token's KV into the
same column, `col`, which moves right one column a step; where a token sits in its sequence is its
own position id (RoPE is applied before the cache). So every row's entries are one run of columns
ending at `col`: [start, col), with its own `start`. A joining sequence's prompt is copied
right-aligned just left of `col` (moving `col` right first if the prompt is longer), rows never
wait for one another, and the decode step has the same shapes every time, which is what lets it
be captured once per batch size and replayed. When `col` reaches the end of the buffer, all rows
shift left together by the same amount (one copy a layer), until the longest starts at column 0.

A sliding-window layer of window W < max_len needs no column before `col - W + 1`: its rows are
rings of W columns, column c kept at c % W (all rows write the same column, so one ring index
serves every row). Its buffers are W columns, not max_len: for Gemma 3's five local layers in six
at a 512-token window, a row holds about a quarter of the KV of full rows at 4,096 columns. A
joining prompt leaves its last W columns there; a shift rolls the ring with the columns.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence, Set
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from chatqueue.engine.runner import NewSequence

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class KvShape:
    """What one row holds per layer: `kv_heads` heads of `head_dim` per column."""

    num_layers: int
    kv_heads: int
    head_dim: int


class KvSlots:
    """The KV buffers and, per packed row, its sequence, first column, next token and position.
    Tensors here are the decode step's inputs: they are written in place, never replaced, so
    that captured CUDA graphs keep reading them."""

    def __init__(
        self,
        *,
        shape: KvShape,
        max_batch: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device,
        windows: Sequence[int | None] = (),
    ) -> None:
        """`windows`: each layer's sliding window (None, or no entry: full attention); a layer
        with one shorter than `max_len` keeps a ring of that many columns a row."""
        self.shape, self.max_len, self.dtype, self.device = shape, max_len, dtype, device
        windows = list(windows) + [None] * (shape.num_layers - len(windows))
        # the columns each layer's rows hold: max_len, or a ring of its window
        self.lengths = [self.columns(w) for w in windows]

        def buffers() -> list[torch.Tensor]:
            return [
                torch.zeros(
                    (max_batch, shape.kv_heads, n, shape.head_dim), dtype=dtype, device=device
                )
                for n in self.lengths
            ]

        self.k, self.v = buffers(), buffers()
        # the first column each row holds; its entries run from there to `col`
        self.start = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.ids = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.pos = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.col_t = torch.zeros(1, dtype=torch.long, device=device)
        self.col = 0  # host mirror of col_t
        self.rids: list[int] = []  # rid of each packed row
        self.starts: list[int] = []  # host mirror of start for the packed rows
        self.num_compactions = 0

    def columns(self, window: int | None) -> int:
        """The columns a row holds in a layer of this sliding window (None: full attention)."""
        return self.max_len if window is None else min(window, self.max_len)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def release(self, gone: Set[int]) -> None:
        """Free the rows of `gone`, the last row moving into each hole."""
        for rid in [s for s in self.rids if s in gone]:
            row, last = self.rids.index(rid), len(self.rids) - 1
            if row != last:
                self._move_row(last, row)
            self.rids.pop()
            self.starts.pop()

    def _move_row(self, src: int, dst: int) -> None:
        for buffers in (self.k, self.v):
            for layer in buffers:
                layer[dst].copy_(layer[src])
        for t in (self.start, self.ids, self.pos):
            t[dst].copy_(t[src])
        self.rids[dst] = self.rids[src]
        self.starts[dst] = self.starts[src]

    def add(self, new: NewSequence, cache: DynamicCache, first_token: torch.Tensor) -> None:
        """Copy a prefilled prompt right-aligned just left of `col`; it decodes from next step."""
        n = len(new.prompt_ids)
        self.compact_if_full()
        if self.col < n:  # rows end at `col`: move them right to make room for the prompt
            self._shift(n - self.col)
        row = len(self.rids)
        start = self.col - n
        rings: dict[int, torch.Tensor] = {}  # a ring's length -> where the prompt's last go
        for i, layer in enumerate(cache.layers):
            assert isinstance(layer, DynamicLayer) and layer.keys is not None
            assert layer.values is not None
            keys, values, length = layer.keys[0], layer.values[0], self.lengths[i]
            if length == self.max_len:
                self.k[i][row, :, start : self.col].copy_(keys)
                self.v[i][row, :, start : self.col].copy_(values)
                continue
            m = min(n, length)  # the ring keeps the prompt's last `length` columns
            if length not in rings:
                columns = torch.arange(self.col - m, self.col, device=self.device)
                rings[length] = columns % length
            self.k[i][row].index_copy_(1, rings[length], keys[:, -m:])
            self.v[i][row].index_copy_(1, rings[length], values[:, -m:])
        self.start[row] = start
        self.ids[row] = first_token
        self.pos[row] = n
        self.rids.append(new.rid)
        self.starts.append(start)

    def set_col(self, col: int) -> None:
        self.col = col
        self.col_t.fill_(col)

    def advance(self, b: int) -> None:
        """The decode step's end, on the device: rows [0, b) one position on, `col` with them."""
        self.pos[:b].add_(1)
        self.col_t.add_(1)

    def stepped(self) -> None:
        """The decode step moved `col_t` on the device; follow it here without a sync."""
        self.col += 1

    def reset(self) -> None:
        """Forget what warm-up steps wrote; only valid while no row is held."""
        self.start.zero_()
        self.pos.zero_()
        self.set_col(0)

    def clear(self) -> None:
        self.k.clear()
        self.v.clear()

    def compact_if_full(self) -> None:
        if self.col >= self.max_len:
            self._compact()

    def _compact(self) -> None:
        """Shift every row left by the same amount, so the longest row starts at column 0."""
        shift = min(self.starts, default=self.col)
        assert shift > 0, "a sequence outgrew max_len"
        self._shift(-shift)
        self.num_compactions += 1
        log.debug("compacted the static cache to %s columns", self.col)

    def _shift(self, delta: int) -> None:
        """Move every row's entries `delta` columns (left if negative), `col` with them."""
        lo = max(0, -delta)
        for buffers in (self.k, self.v):
            for layer, length in zip(buffers, self.lengths, strict=True):
                if length == self.max_len:
                    moved = layer[:, :, lo : self.col].clone()
                    layer[:, :, lo + delta : self.col + delta].copy_(moved)
                else:  # column c is at c % length: the same columns moved, the ring rolls
                    layer.copy_(layer.roll(delta, dims=2))
        self.start.add_(delta)
        self.starts = [start + delta for start in self.starts]
        self.set_col(self.col + delta)

"""The static cache's rows (`engine/hf/static/slots.py`) with a sliding-window layer beside a full
one: whatever prompts join, leave, shift the columns right or compact them left, the ring of W
columns holds exactly the last W columns the full layer holds, each at column % W."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from chatqueue.engine.hf.static.slots import KvShape, KvSlots
from chatqueue.engine.runner import NewSequence
from chatqueue.types import SamplingParams

WINDOW, MAX_LEN = 5, 16


def _prompt_cache(rid: int, n: int) -> DynamicCache:
    """A prompt's KV in both layers: each column's value says whose row and which position."""
    values = (rid * 100 + torch.arange(n, dtype=torch.float32)).view(1, 1, n, 1)
    cache = DynamicCache()
    for layer in range(2):
        cache.update(values.clone(), -values.clone(), layer)
    return cache


def _check(slots: KvSlots) -> None:
    """Each row's ring (layer 1) against its full row (layer 0), column by column."""
    for row, start in enumerate(slots.starts):
        for col in range(max(start, slots.col - WINDOW), slots.col):
            full = slots.k[0][row, 0, col, 0]
            assert slots.k[1][row, 0, col % WINDOW, 0] == full, (row, col)
            assert slots.v[1][row, 0, col % WINDOW, 0] == -full, (row, col)


def _decode(slots: KvSlots) -> None:
    """A step's write, as the decode step makes it: every row's next value at `col`."""
    for row, rid in enumerate(slots.rids):
        value = rid * 100 + slots.pos[row].item()
        slots.k[0][row, 0, slots.col, 0] = value
        slots.v[0][row, 0, slots.col, 0] = -value
        slots.k[1][row, 0, slots.col % WINDOW, 0] = value
        slots.v[1][row, 0, slots.col % WINDOW, 0] = -value
    slots.advance(len(slots.rids))
    slots.stepped()


def test_a_windowed_layer_keeps_a_ring_of_its_window() -> None:
    slots = KvSlots(
        shape=KvShape(num_layers=2, kv_heads=1, head_dim=1),
        max_batch=3,
        max_len=MAX_LEN,
        dtype=torch.float32,
        device=torch.device("cpu"),
        windows=[None, WINDOW],
    )
    assert [k.shape[2] for k in slots.k] == [MAX_LEN, WINDOW]
    greedy = SamplingParams(temperature=0)
    token = torch.tensor(0)
    lengths = iter([3, 9, 2, 7, 4, 11, 1, 6, 8, 5, 3, 10])  # prompts, joining in this order
    next_rid = 1
    for _ in range(60):
        # a row leaves at 13 tokens; a prompt joins where a row is free (a longer one than
        # `col` shifts every row right; `col` at the end compacts them left)
        slots.release({rid for row, rid in enumerate(slots.rids) if slots.pos[row] >= 13})
        if len(slots.rids) < 3 and (n := next(lengths, None)) is not None:
            slots.add(NewSequence(next_rid, [0] * n, greedy), _prompt_cache(next_rid, n), token)
            next_rid += 1
            _check(slots)
        slots.compact_if_full()
        _decode(slots)
        _check(slots)
    assert next_rid == 13 and slots.num_compactions > 0

"""The decode step apart's input tables (`engine/hf/paged/decode.py`): rows whose blocks grew get
only their new entries written, and the tables then equal those written whole."""

from __future__ import annotations

import torch

from chatqueue.engine.hf.paged.decode import DecodeRow, PagedInputs
from chatqueue.engine.hf.paged.pool import KVPool, KVShape

SHAPE = KVShape(num_layers=1, num_kv_heads=1, head_dim=4, dtype=torch.float32)


def inputs() -> PagedInputs:
    kv = KVPool(SHAPE, num_blocks=40, block_size=4, device=torch.device("cpu"))
    return PagedInputs(kv, max_batch=4, max_len=32)


def test_grown_rows_get_their_new_blocks_and_equal_a_whole_write() -> None:
    lists = [[1, 2], [3], [4, 5, 6]]
    grown = inputs()
    grown.set_rows([DecodeRow(i, 4 * len(b) - 1, b) for i, b in enumerate(lists)])
    lists[0].append(7)
    lists[2] += [8, 9]
    assert grown.grow([(0, lists[0]), (2, lists[2])])

    whole = inputs()
    whole.set_rows([DecodeRow(i, 4 * len(b) - 1, b) for i, b in enumerate(lists)])
    assert torch.equal(grown.table, whole.table)
    assert grown.table[2, :5].tolist() == [4, 5, 6, 8, 9]
    assert torch.equal(grown._table_host, whole._table_host)


def test_a_row_holding_another_list_is_left_to_a_whole_write() -> None:
    lists = [[1, 2], [3]]
    rows = inputs()
    rows.set_rows([DecodeRow(i, 3, b) for i, b in enumerate(lists)])
    before = rows.table.clone()
    assert not rows.grow([(1, [3, 10])])  # a resumed sequence's new list, not the one held
    assert not rows.grow([(3, [11])])  # an idle row
    assert torch.equal(rows.table, before)

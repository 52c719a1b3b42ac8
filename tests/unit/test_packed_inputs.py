"""The packed step's device tables and inputs (`engine/hf/paged/packed.py`): a sequence's table
row written only when its blocks change, rows handed back and reused, padding past the step's
tokens and tiles that reads and writes nothing of anyone's."""

from __future__ import annotations

import pytest
import torch

from chatqueue.engine.hf.paged.packed import BlockTables, PackedInputs
from chatqueue.engine.hf.paged.pool import KVPool, KVShape

SHAPE = KVShape(num_layers=1, num_kv_heads=1, head_dim=4, dtype=torch.float32)


def pool() -> KVPool:
    return KVPool(SHAPE, num_blocks=10, block_size=4, device=torch.device("cpu"))


def test_a_row_is_written_when_its_blocks_change_and_reused_once_released() -> None:
    kv = pool()
    tables = BlockTables(kv, rows=2, width=3)
    blocks = [4, 7]
    row = tables.row(1, blocks)
    tables.sync()
    assert tables.device[row].tolist() == [4, 7, kv.scratch_block]
    assert tables.row(1, blocks) == row and not tables._dirty  # unchanged: nothing to copy
    blocks.append(2)  # the sequence grew a block
    tables.row(1, blocks)
    assert tables._dirty
    tables.sync()
    assert tables.device[row].tolist() == [4, 7, 2]
    tables.row(1, [5])  # resumed after preemption: another list, same rid
    tables.sync()
    assert tables.device[row, 0].item() == 5
    other = tables.row(2, [3])
    assert other != row
    with pytest.raises(AssertionError, match="more than 2 sequences"):
        tables.row(3, [1])
    tables.release([1])
    assert tables.row(3, [1]) == row
    assert tables.device[tables.pad_row].tolist() == [kv.scratch_block] * 3


def test_tokens_and_tiles_past_the_step_are_padding() -> None:
    kv = pool()
    inputs = PackedInputs(kv, most=6, pad_row=9)
    # a decode row (its id comes from the device), then a chunk of 2 prompt tokens; tiles are
    # (first, count, row, end), four numbers each, flat
    inputs.write(
        ids=[11, 12], positions=[5, 0, 1], slots=[21, 8, 9], tiles=[0, 1, 0, 6, 1, 2, 1, 2]
    )
    assert inputs.ids.tolist() == [0, 11, 12, 0, 0, 0]
    assert inputs.pos.tolist() == [5, 0, 1, 0, 0, 0]
    scratch = kv.scratch_block * kv.block_size
    assert inputs.slot.tolist() == [21, 8, 9, scratch, scratch, scratch]
    assert inputs.tiles.is_contiguous()
    assert inputs.tiles.tolist() == [[0, 1, 0], [1, 2, 1], *[[0, 0, 9]] * 4]
    assert inputs.end.tolist() == [6, 2, 0, 0, 0, 0]
    inputs.write(ids=[], positions=[3], slots=[13], tiles=[0, 1, 0, 4])  # the last step's gone
    assert inputs.pos.tolist() == [3, 0, 0, 0, 0, 0]
    assert inputs.tiles.tolist()[1:] == [[0, 0, 9]] * 5

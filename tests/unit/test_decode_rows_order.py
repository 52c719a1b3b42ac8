"""The paged runner's decode rows when sequences leave: each emptied row is filled by a staying
row from the end, every other row keeps its place (its block table is not written again)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from chatqueue.engine.hf.paged.runner import _filled_from_tail


@dataclass
class _Row:
    rid: int


@pytest.mark.parametrize(
    ("gone", "order"),
    [
        (set(), [0, 1, 2, 3, 4, 5]),
        ({1}, [0, 5, 2, 3, 4]),
        ({1, 4}, [0, 5, 2, 3]),
        ({0, 1}, [4, 5, 2, 3]),
        ({4, 5}, [0, 1, 2, 3]),
        ({0, 5}, [4, 1, 2, 3]),
        ({0, 1, 2, 3, 4, 5}, []),
    ],
)
def test_rows_left_empty_are_filled_from_the_end(gone: set[int], order: list[int]) -> None:
    rows = [_Row(rid) for rid in range(10, 16)]
    kept = _filled_from_tail(rows, {10 + r for r in gone})  # type: ignore[arg-type]
    assert kept == order
    staying = [r for r in range(6) if r not in gone]
    assert sorted(kept) == staying
    moved = [row for row, was in enumerate(kept) if row != was]
    assert len(moved) == sum(1 for r in gone if r < len(staying))

"""The block manager alone: refcounts, prefix hits, eviction order, collisions."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from chatqueue.scheduler.blocks import BlockManager


def make(num_blocks: int = 8, block_size: int = 4, **kw: object) -> BlockManager:
    return BlockManager(num_blocks=num_blocks, block_size=block_size, **kw)  # type: ignore[arg-type]


def run(kv: BlockManager, key: object, ids: Sequence[int]) -> tuple[int, ...]:
    """A sequence that is allocated, computed whole and freed; returns its blocks."""
    kv.allocate(key, ids)
    kv.mark_computed(key, ids, len(ids))
    table = kv.block_table(key)
    kv.free(key)
    return table


def test_a_sequence_takes_the_blocks_its_tokens_need_and_gives_them_back() -> None:
    kv = make(num_blocks=4, block_size=4)
    got = kv.allocate("a", list(range(9)))  # 3 blocks, the last one partial
    assert len(got.block_ids) == 3 and got.num_cached_tokens == 0
    assert kv.num_free_blocks == 1 and kv.num_used_blocks == 3
    assert not kv.can_allocate(list(range(100, 109)))
    kv.free("a")
    assert kv.num_free_blocks == 4


def test_a_prefix_computed_before_is_found_whole_blocks_only() -> None:
    kv = make()
    first = run(kv, "a", list(range(10)))  # blocks [0-3] [4-7] registered, [8-9] partial
    again = kv.allocate("b", [*range(10), 50, 51, 52])
    assert again.num_cached_tokens == 8
    assert again.block_ids[:2] == first[:2]
    assert kv.hit_rate == pytest.approx(8 / 23)


def test_a_prefix_that_ends_inside_a_block_reuses_the_blocks_before_it() -> None:
    kv = make()
    run(kv, "a", list(range(12)))
    got = kv.allocate("b", [*range(6), 99, 98, 97, 96])  # diverges inside the second block
    assert got.num_cached_tokens == 4


def test_at_least_one_token_is_left_to_compute() -> None:
    kv = make()
    run(kv, "a", list(range(8)))
    assert kv.allocate("b", list(range(8))).num_cached_tokens == 4  # not 8: logits are needed
    assert kv.allocate("c", list(range(9))).num_cached_tokens == 8


def test_a_block_is_only_found_once_its_kv_is_marked_computed() -> None:
    kv = make()
    ids = list(range(12))
    kv.allocate("a", ids)
    assert kv.allocate("b", ids).num_cached_tokens == 0  # "a" is still prefilling
    kv.mark_computed("a", ids, 5)  # one full block written
    assert kv.allocate("c", ids).num_cached_tokens == 4


def test_generated_tokens_fill_blocks_that_later_turns_find() -> None:
    kv = make(block_size=4)
    prompt, reply = [1, 2, 3], [7, 8, 9, 10, 11]
    kv.allocate("a", prompt)
    tokens = list(prompt)
    for token in reply:  # a decode step: room for the pending token, then its KV is written
        tokens.append(token)
        kv.append("a", len(tokens))
        kv.mark_computed("a", tokens, len(tokens))
    kv.free("a")
    turn2 = kv.allocate("b", [*prompt, *reply, 40, 41])
    assert turn2.num_cached_tokens == 8


def test_shared_blocks_are_counted_and_never_freed_while_used() -> None:
    kv = make(num_blocks=4, block_size=4)
    system = list(range(8))
    run(kv, "warm", [*system, 1])
    a = kv.allocate("a", [*system, 1, 2])
    b = kv.allocate("b", [*system, 3])
    assert a.block_ids[:2] == b.block_ids[:2]  # two users, one copy of the system prompt
    assert kv.num_used_blocks == 4  # 2 shared + 1 each
    kv.free("a")
    assert kv.num_used_blocks == 3  # still held by "b"
    assert not kv.can_allocate(list(range(100, 108)))  # needs 2: only 1 free, no steal
    kv.allocate("c", list(range(100, 104)))
    assert set(kv.block_table("c")).isdisjoint(kv.block_table("b"))
    kv.free("b")
    kv.free("c")
    assert kv.num_free_blocks == 4


def test_unused_cached_blocks_are_evicted_least_recently_used_first() -> None:
    kv = make(num_blocks=4, block_size=2)
    run(kv, "old", [1, 2, 3])  # registers [1,2]; [3] partial
    run(kv, "new", [5, 6, 7])  # registers [5,6]
    kv.allocate("reuse-old", [1, 2, 9])  # touches [1,2]: now the most recent
    kv.free("reuse-old")
    kv.allocate("big", list(range(20, 26)))  # needs 3: the 2 empty blocks, then evicts [5,6]
    kv.free("big")
    assert kv.allocate("x", [1, 2, 0]).num_cached_tokens == 2
    assert kv.allocate("y", [5, 6, 0]).num_cached_tokens == 0


def test_a_sequence_tail_is_evicted_before_its_head() -> None:
    kv = make(num_blocks=3, block_size=2)
    run(kv, "a", [1, 2, 3, 4, 5])  # registers [1,2] and [3,4]
    kv.allocate("b", [9, 9, 9])  # needs 2: the empty one, then the LRU: the tail [3,4]
    kv.free("b")
    assert kv.allocate("c", [1, 2, 3, 4, 0]).num_cached_tokens == 2


def test_a_hash_collision_is_never_taken_for_an_equal_prefix() -> None:
    def colliding(parent: bytes, ids: Sequence[int]) -> bytes:
        return b"same"  # every block gets the same key

    kv = make(hash_fn=colliding)
    run(kv, "a", [1, 2, 3, 4, 5])
    assert kv.allocate("b", [6, 7, 8, 9, 10]).num_cached_tokens == 0
    assert kv.allocate("c", [1, 2, 3, 4, 11]).num_cached_tokens == 4


def test_the_cache_key_separates_models() -> None:
    ids = list(range(9))
    a, b = make(cache_key="model-a fp32"), make(cache_key="model-b fp32")
    run(a, "x", ids)
    run(b, "x", ids)
    assert a._registered.keys().isdisjoint(b._registered.keys())


def test_prefix_caching_off_finds_nothing() -> None:
    kv = make(prefix_caching=False)
    run(kv, "a", list(range(12)))
    assert kv.allocate("b", list(range(12))).num_cached_tokens == 0
    assert kv.num_cached_blocks == 0


def test_growth_takes_a_block_only_at_a_block_boundary() -> None:
    kv = make(num_blocks=3, block_size=4)
    kv.allocate("a", [1, 2, 3])
    assert kv.append("a", 4) == []
    assert len(kv.append("a", 5)) == 1
    kv.allocate("b", [1])
    assert not kv.can_append("a", 9)

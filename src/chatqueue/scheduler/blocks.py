"""KV memory in fixed-size blocks: a block table per sequence, refcounts, automatic prefix reuse.
Pure Python, no torch: the scheduler admits by it, and a runner stores KV where its tables say.

NOTE: the algorithm (nano-vllm's block manager, vLLM's automatic prefix caching). The pool holds
`num_blocks` blocks of `block_size` tokens; a sequence holds a table of blocks in token order. Once
a full block's KV has been computed (`mark_computed`), it is registered under a hash chained over
every token id up to its end, seeded with the cache key (whatever else changes the KV: the model,
its dtype, an adapter). A later sequence whose tokens start the same way walks that chain and
shares the blocks it finds (refcount + 1) instead of computing them; only full blocks are shared,
so a prefix that ends inside a block reuses the blocks before it. A block no sequence holds is
free; a registered free block stays findable until a new block is needed, least recently used
first (a sequence's tail before its head). A block with a reference is never handed out.

The hash is SHA-256 over the exact token ids, and a hit also compares the block's own ids: two
different prefixes are never confused.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

HashFn = Callable[[bytes, Sequence[int]], bytes]


def chain_hash(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """A block's key: its parent block's key and its own token ids, exactly."""
    return hashlib.sha256(parent + array("q", token_ids).tobytes()).digest()


@dataclass(slots=True)
class _Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None  # set while registered (findable by later sequences)
    token_ids: tuple[int, ...] = ()  # a registered block's own ids, compared on a hit


@dataclass(slots=True)
class _Table:
    block_ids: list[int]
    hashes: list[bytes] = field(default_factory=list)  # keys of its leading full blocks
    num_marked: int = 0  # leading full blocks already registered, found, or left as duplicates


@dataclass(frozen=True, slots=True)
class Allocation:
    block_ids: tuple[int, ...]
    num_cached_tokens: int  # leading tokens whose KV the shared blocks already hold


class BlockManager:
    """Blocks for sequences named by any hashable key (the scheduler uses request ids).

    Check/act pairs: `can_allocate`/`allocate` for a new sequence, `can_append`/`append` as one
    grows; `mark_computed` once its KV is written, `free` when it leaves."""

    def __init__(
        self,
        *,
        num_blocks: int,
        block_size: int,
        cache_key: str = "",
        prefix_caching: bool = True,
        hash_fn: HashFn = chain_hash,
    ) -> None:
        assert num_blocks >= 1 and block_size >= 1
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._hash = hash_fn
        self._root = hashlib.sha256(cache_key.encode()).digest()
        self._blocks = [_Block(i) for i in range(num_blocks)]
        # free blocks in the order they are handed out: never-registered ones first, then the
        # registered ones least recently used first
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._registered: dict[bytes, int] = {}
        self._tables: dict[Hashable, _Table] = {}
        self.num_queried_tokens = 0  # tokens of every allocation, and of those found cached
        self.num_hit_tokens = 0

    # -- figures --------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds (registered ones among them, reusable until evicted)."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._registered)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def hit_rate(self) -> float | None:
        """Share of allocated tokens found cached, or None before any allocation."""
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else None

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, key: Hashable) -> tuple[int, ...]:
        return tuple(self._tables[key].block_ids)

    def holds(self, key: Hashable) -> bool:
        return key in self._tables

    # -- a new sequence -------------------------------------------------------------------
    def can_allocate(self, token_ids: Sequence[int]) -> bool:
        hashes = self._full_block_hashes(token_ids)
        hits = self._hits(token_ids, hashes)
        revived = sum(1 for b in hits if self._blocks[b].ref_count == 0)  # free now, taken then
        return self.blocks_for(len(token_ids)) - len(hits) + revived <= len(self._free)

    def allocate(self, key: Hashable, token_ids: Sequence[int]) -> Allocation:
        assert key not in self._tables, f"{key!r} already holds blocks"
        assert self.can_allocate(token_ids), "allocate without room: call can_allocate first"
        hashes = self._full_block_hashes(token_ids)
        hits = self._hits(token_ids, hashes)
        for block_id in hits:
            self._take(block_id)
        new = [self._take_free() for _ in range(self.blocks_for(len(token_ids)) - len(hits))]
        self._tables[key] = _Table(hits + new, hashes, num_marked=len(hits))
        cached = len(hits) * self.block_size
        self.num_queried_tokens += len(token_ids)
        self.num_hit_tokens += cached
        return Allocation(tuple(hits + new), cached)

    # -- a growing sequence ---------------------------------------------------------------
    def can_append(self, key: Hashable, num_tokens: int) -> bool:
        """Whether the sequence can grow to hold `num_tokens` tokens."""
        missing = self.blocks_for(num_tokens) - len(self._tables[key].block_ids)
        return missing <= len(self._free)

    def append(self, key: Hashable, num_tokens: int) -> list[int]:
        """Grow the sequence's table to hold `num_tokens` tokens; returns the blocks added."""
        assert self.can_append(key, num_tokens), "append without room: call can_append first"
        table = self._tables[key]
        new = [self._take_free() for _ in range(self.blocks_for(num_tokens) - len(table.block_ids))]
        table.block_ids += new
        return new

    def needs_marking(self, key: Hashable, num_computed: int) -> bool:
        """Whether `mark_computed` would register anything (so callers build ids only then)."""
        table = self._tables.get(key)
        return (
            self.prefix_caching
            and table is not None
            and num_computed // self.block_size > table.num_marked
        )

    def mark_computed(self, key: Hashable, token_ids: Sequence[int], num_computed: int) -> None:
        """The KV of the sequence's first `num_computed` tokens (`token_ids` holds at least
        those) is written: register its full blocks, so that later sequences find them."""
        if not self.needs_marking(key, num_computed):
            return
        table = self._tables[key]
        size = self.block_size
        for index in range(table.num_marked, num_computed // size):
            ids = tuple(token_ids[index * size : (index + 1) * size])
            if index == len(table.hashes):
                parent = table.hashes[-1] if table.hashes else self._root
                table.hashes.append(self._hash(parent, ids))
            block = self._blocks[table.block_ids[index]]
            key_hash = table.hashes[index]
            if key_hash not in self._registered:  # else an equal block is findable already
                self._registered[key_hash] = block.block_id
                block.hash, block.token_ids = key_hash, ids
        table.num_marked = num_computed // size

    # -- leaving --------------------------------------------------------------------------
    def free(self, key: Hashable) -> None:
        """Drop the sequence's references; its registered blocks stay findable, its tail ones
        evicted first."""
        table = self._tables.pop(key)
        for block_id in reversed(table.block_ids):
            block = self._blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0
            if block.ref_count == 0:
                self._free[block_id] = None
                if block.hash is None:  # holds nothing anyone can find: hand it out first
                    self._free.move_to_end(block_id, last=False)

    # -- inside ---------------------------------------------------------------------------
    def _full_block_hashes(self, token_ids: Sequence[int]) -> list[bytes]:
        if not self.prefix_caching:
            return []
        size, parent, hashes = self.block_size, self._root, []
        for start in range(0, len(token_ids) - size + 1, size):
            parent = self._hash(parent, token_ids[start : start + size])
            hashes.append(parent)
        return hashes

    def _hits(self, token_ids: Sequence[int], hashes: list[bytes]) -> list[int]:
        """The registered blocks that hold the longest cached prefix; at least one token is
        always left to compute (the step needs its logits)."""
        size, hits = self.block_size, []
        for index, key_hash in enumerate(hashes[: (len(token_ids) - 1) // size]):
            block_id = self._registered.get(key_hash)
            if block_id is None:
                break
            if self._blocks[block_id].token_ids != tuple(
                token_ids[index * size : (index + 1) * size]
            ):
                break  # a hash collision: never taken for the same prefix
            hits.append(block_id)
        return hits

    def _take(self, block_id: int) -> None:
        block = self._blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def _take_free(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self._blocks[block_id]
        assert block.ref_count == 0
        if block.hash is not None:  # evicted: no longer findable
            del self._registered[block.hash]
            block.hash, block.token_ids = None, ()
        block.ref_count = 1
        return block_id

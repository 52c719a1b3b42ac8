"""The llama.cpp runner's slot table: which slot a new prompt takes and how much of it is cached."""

from __future__ import annotations

from chatqueue.engine.llamacpp.slots import Claim, SlotTable


def fill(table: SlotTable, rid: int, prompt: list[int], generated: list[int]) -> Claim:
    """Claim a slot for `prompt`, feed the rest of it and `generated` (as the runner does)."""
    claim = table.claim(rid, prompt)
    table.tokens(claim.slot).extend(prompt[claim.reused :] + generated)
    return claim


def test_a_new_prompt_takes_the_free_slot_with_the_longest_common_prefix() -> None:
    table = SlotTable(3)
    a = fill(table, 0, [1, 2, 3], [4, 5])
    b = fill(table, 1, [1, 9, 9], [6])
    table.release(a.slot)
    table.release(b.slot)

    claim = table.claim(2, [1, 2, 3, 4, 7, 8])

    assert claim == Claim(a.slot, 4)
    assert table.tokens(a.slot) == [1, 2, 3, 4]  # cut to the shared prefix
    assert (table.stats.hits, table.stats.reused_tokens, table.stats.prompts) == (1, 4, 3)


def test_the_prompts_last_token_always_runs_again() -> None:
    table = SlotTable(1)
    first = fill(table, 0, [1, 2, 3], [4])
    table.release(first.slot)

    assert table.claim(1, [1, 2, 3]) == Claim(first.slot, 2)
    assert table.tokens(first.slot) == [1, 2]


def test_a_running_sequences_slot_is_never_taken() -> None:
    table = SlotTable(2)
    busy = fill(table, 0, [1, 2, 3], [])
    claim = table.claim(1, [1, 2, 3, 4])
    assert claim.slot != busy.slot and claim.reused == 0
    assert table.num_free == 0


def test_with_no_prefix_anywhere_the_slot_free_the_longest_goes_first() -> None:
    table = SlotTable(2)
    a = fill(table, 0, [1], [])
    b = fill(table, 1, [2], [])
    table.release(b.slot)
    table.release(a.slot)  # a was freed last: b's cache is older

    assert table.claim(2, [7, 8]).slot == b.slot


def test_a_cache_that_could_not_be_cut_is_forgotten() -> None:
    table = SlotTable(1)
    table.release(fill(table, 0, [1, 2, 3], []).slot)
    claim = table.claim(1, [1, 2, 5])

    assert table.forget(claim) == Claim(claim.slot, 0)
    assert table.tokens(claim.slot) == []
    assert (table.stats.hits, table.stats.reused_tokens) == (0, 0)


def test_without_reuse_a_prompt_takes_the_slot_free_the_longest_and_none_of_its_cache() -> None:
    table = SlotTable(2)
    a = fill(table, 0, [1, 2, 3], [4])
    b = fill(table, 1, [9], [])
    table.release(a.slot)
    table.release(b.slot)  # a's cache is older, and shares the prompt's prefix

    claim = table.claim(2, [1, 2, 3, 4, 5], reuse=False)

    assert claim == Claim(a.slot, 0)
    assert table.tokens(a.slot) == []
    assert (table.stats.hits, table.stats.reused_tokens) == (0, 0)


def test_the_slot_elsewhere_holding_most_of_a_prompt_busy_or_free() -> None:
    table = SlotTable(3)
    busy = fill(table, 0, [1, 2, 3, 4], [5])  # still running
    free = fill(table, 1, [1, 2, 9], [])
    table.release(free.slot)
    target = table.claim(2, [1, 2, 3, 4, 6])  # the free slot with the longest prefix: 2 tokens

    assert target == Claim(free.slot, 2)
    assert table.best_elsewhere(target.slot, [1, 2, 3, 4, 6]) == (busy.slot, 4)
    assert table.best_elsewhere(target.slot, [7, 8]) == (-1, 0)

    table.copy(busy.slot, target.slot, 4)
    assert table.tokens(target.slot) == [1, 2, 3, 4]
    assert table.tokens(busy.slot) == [1, 2, 3, 4, 5]  # the source keeps its own
    # one hit for the prompt, its 2 reused tokens now 4
    assert (table.stats.hits, table.stats.reused_tokens) == (1, 4)

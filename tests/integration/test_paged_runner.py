"""The paged KV runner against `model.generate`, driven by the real scheduler and block manager.

Steps go the way the engine drives them: the scheduler admits by blocks, hands out block tables
and cached prefixes, grows and preempts; every greedy output must equal what
`generate(do_sample=False)` gives for that request alone, with prefix hits, prefixes that end
inside a block, prompts prefilled in chunks beside decode, and preemption and resume. Each test
runs three times: the decode rows packed with the prompts into the model's forward (the CPU's
way); apart, through the family's decode step over block tables (the GPU's way; here eager,
SDPA), steps with prompt tokens packed through the same step; and so again with the packed
steps' attention through tiles, table rows and ends, as the GPU's kernel reads them (its
contract in torch, `tests/support/packed_reference.py`).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from transformers import LlamaForCausalLM

from chatqueue.engine.hf.paged import HFPagedRunner
from chatqueue.engine.hf.paged.decode import DecodeRow, PagedInputs
from chatqueue.engine.hf.paged.pool import KVPool, KVShape
from chatqueue.engine.prefill_budget import PrefillBudget
from tests.integration.test_hf_runner import reference, tiny_llama
from tests.support.paged_drive import MODES, drive, make_paged, prompts_of

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_model() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture(params=MODES)
def paged(request: pytest.FixtureRequest) -> Callable[..., HFPagedRunner]:
    """Makes a paged runner whose decode rows go as this test's parameter says."""

    def make(model: LlamaForCausalLM, **kw: object) -> HFPagedRunner:
        return make_paged(model, request.param, **kw)

    return make


def test_greedy_equals_generate_while_sequences_join_and_leave(
    tiny_model: LlamaForCausalLM,
    paged: Callable[..., HFPagedRunner],
) -> None:
    prompts = prompts_of([5, 17, 3, 30, 9, 1, 22, 12])
    new_tokens = [12, 4, 9, 12, 2, 7, 12, 5]
    expected = {i: reference(tiny_model, p, new_tokens[i]) for i, p in enumerate(prompts)}
    runner = paged(tiny_model, num_blocks=64, block_size=4)

    got = drive(
        runner,
        prompts,
        joins={0: [0, 1, 2], 2: [3], 3: [4, 5], 7: [6], 9: [7]},
        max_new=lambda i: len(expected[i]),
    )

    assert got.outputs == expected


def test_a_later_request_reuses_a_cached_prefix_and_still_equals_generate(
    tiny_model: LlamaForCausalLM,
    paged: Callable[..., HFPagedRunner],
) -> None:
    system = prompts_of([24], seed=2)[0]  # 6 blocks of 4
    first = [*system, 7, 8, 9]
    runner = paged(tiny_model, num_blocks=64, block_size=4)
    turn1 = drive(runner, [first], joins={0: [0]}, max_new=lambda _: 10)
    assert turn1.outputs[0] == reference(tiny_model, first, 10)
    # turn 2: the same system prompt, turn 1's prompt and reply, then more; and a second user
    # whose prompt shares only the system prompt and ends inside a block
    turn2 = [*first, *turn1.outputs[0], 11, 12, 13]
    other = [*system, 5, 6]
    prompts = [turn2, other]
    expected = {i: reference(tiny_model, p, 8) for i, p in enumerate(prompts)}

    got = drive(runner, prompts, joins={0: [0, 1]}, max_new=lambda _: 8, rid_base=10)

    assert got.outputs == expected
    # turn 1 wrote 29 + 9 = 38 tokens of KV (its last token was never fed): 9 full blocks
    assert got.cached == {0: 36, 1: 24}


@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_long_prompts_go_through_in_chunks_beside_decode(
    tiny_model: LlamaForCausalLM, paged: Callable[..., HFPagedRunner], chunk: int
) -> None:
    prompts = prompts_of([40, 3, 57, 9], seed=3)
    expected = {i: reference(tiny_model, p, 10) for i, p in enumerate(prompts)}
    runner = paged(tiny_model, num_blocks=96, block_size=4, prefill_chunk=chunk)

    got = drive(runner, prompts, joins={0: [1], 1: [0], 3: [2, 3]}, max_new=lambda _: 10)

    assert got.outputs == expected
    # the running streams never stopped: every step produced a token for each decoding row
    assert got.steps >= (57 + chunk - 1) // chunk


class SpyBudget(PrefillBudget):
    """A budget that has learned prompt tokens are dear: 8 a step while streams decode."""

    def tokens(self, *, decoding: int, waiting: int) -> int:
        self.asked.append((decoding, waiting))  # type: ignore[attr-defined]
        return 8 if decoding else self.most

    def observe(self, seconds: float, *, decode_rows: int, prompt_tokens: int) -> None:
        self.seen.append((decode_rows, prompt_tokens))  # type: ignore[attr-defined]


def test_while_streams_decode_a_step_takes_the_budgets_prompt_tokens(
    tiny_model: LlamaForCausalLM,
    paged: Callable[..., HFPagedRunner],
) -> None:
    prompts = prompts_of([6, 57, 30], seed=6)
    expected = {i: reference(tiny_model, p, 12) for i, p in enumerate(prompts)}
    runner = paged(tiny_model, num_blocks=96, block_size=4, prefill_stall_limit=3.0)
    spy = SpyBudget(runner.prefill_chunk, 3.0)
    spy.seen, spy.asked = [], []  # type: ignore[attr-defined]
    runner._budget = spy

    got = drive(runner, prompts, joins={0: [0], 2: [1, 2]}, max_new=lambda _: 12)

    assert got.outputs == expected
    seen: list[tuple[int, int]] = spy.seen  # type: ignore[attr-defined]
    assert seen[0] == (0, 6)  # nothing decoding: the whole prompt
    beside_decode = [tokens for rows, tokens in seen if rows and tokens]
    assert max(beside_decode) == 8  # the two prompts, 8 tokens a step
    assert sum(beside_decode) == 57 + 30
    # it is told how many decode and how many prompts wait for their first token
    asked: list[tuple[int, int]] = spy.asked  # type: ignore[attr-defined]
    assert asked[0] == (0, 1)
    assert (1, 2) in asked  # the two prompts joined beside the first's decode


def test_preempted_requests_resume_and_equal_generate(
    tiny_model: LlamaForCausalLM, paged: Callable[..., HFPagedRunner]
) -> None:
    """A pool far too small for all of them: the newest are preempted, recomputed later, and
    nobody's output changes."""
    prompts = prompts_of([10, 14, 7, 12, 9, 11], seed=4)
    expected = {i: reference(tiny_model, p, 24) for i, p in enumerate(prompts)}
    runner = paged(tiny_model, num_blocks=20, block_size=4)  # 80 tokens; 6 x 34 needed

    got = drive(runner, prompts, joins={0: [0, 1, 2, 3, 4, 5]}, max_new=lambda _: 24)

    assert got.outputs == expected
    assert got.preemptions > 0


def test_without_prefix_caching_nothing_is_reused(
    tiny_model: LlamaForCausalLM, paged: Callable[..., HFPagedRunner]
) -> None:
    prompt = prompts_of([20], seed=5)[0]
    runner = paged(tiny_model, num_blocks=32, block_size=4, prefix_caching=False)
    drive(runner, [prompt], joins={0: [0]}, max_new=lambda _: 3)
    again = drive(runner, [prompt], joins={0: [0]}, max_new=lambda _: 3, rid_base=10)
    assert again.cached == {0: 0}
    assert again.outputs[0] == reference(tiny_model, prompt, 3)


def test_a_row_resumed_with_other_blocks_reads_its_new_table() -> None:
    """A sequence preempted and resumed keeps its rid but comes back with other blocks: the
    decode step's table for its row is written again, even at the same row and block count."""
    pool = KVPool(KVShape(1, 1, 4, torch.float32), num_blocks=16, block_size=4, device=CPU)
    inputs = PagedInputs(pool, max_batch=2, max_len=16)
    inputs.set_rows([DecodeRow(5, 9, [1, 2, 3])])
    inputs.set_rows([DecodeRow(5, 9, [7, 8, 9])])  # resumed: a new list, the same rid and length
    assert inputs.table[0, :3].tolist() == [7, 8, 9]
    grown = [7, 8, 9]
    inputs.set_rows([DecodeRow(5, 9, grown)])
    grown.append(10)  # the runner appends a block in place
    inputs.set_rows([DecodeRow(5, 12, grown)])
    assert inputs.table[0, :4].tolist() == [7, 8, 9, 10]
    assert inputs.pos.tolist() == [12, 0] and inputs.live.tolist() == [1, 0]

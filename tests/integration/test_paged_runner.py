"""The paged KV runner against `model.generate`, driven by the real scheduler and block manager.

Steps go the way the engine drives them: the scheduler admits by blocks, hands out block tables
and cached prefixes, grows and preempts; every greedy output must equal what
`generate(do_sample=False)` gives for that request alone, with prefix hits, prefixes that end
inside a block, prompts prefilled in chunks beside decode, and preemption and resume.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from transformers import LlamaForCausalLM

from chatqueue.engine.hf.paged import HFPagedRunner
from chatqueue.engine.prefill_budget import PrefillBudget
from chatqueue.engine.runner import NewSequence, StepBatch
from chatqueue.scheduler import Request, Scheduler
from chatqueue.scheduler.blocks import Allocation, BlockManager
from chatqueue.types import FinishReason, SamplingParams
from tests.integration.test_hf_runner import reference, tiny_llama

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def tiny_model() -> LlamaForCausalLM:
    return tiny_llama()


@dataclass(eq=False, slots=True, kw_only=True)
class Req(Request):
    params: SamplingParams = GREEDY
    max_new: int = 1
    steps_running: int = 0


@dataclass
class Run:
    outputs: dict[int, list[int]]
    cached: dict[int, int]  # rid -> prompt tokens found cached at its first start
    preemptions: int = 0
    steps: int = 0
    prefill_steps: dict[int, int] = field(default_factory=dict)  # rid -> steps before its token


def new_sequence(req: Req, allocation: Allocation | None) -> NewSequence:
    resumed = bool(req.num_preemptions and req.output_ids)
    assert allocation is not None
    return NewSequence(
        req.rid,
        req.token_ids() if resumed else list(req.prompt_ids),
        req.params,
        num_generated=len(req.output_ids) if resumed else 0,
        block_table=allocation.block_ids,
        num_cached_tokens=allocation.num_cached_tokens,
    )


def drive(
    runner: HFPagedRunner,
    prompts: list[list[int]],
    *,
    joins: dict[int, list[int]],
    max_new: Callable[[int], int],
    max_concurrent: int = 8,
    rid_base: int = 0,
) -> Run:
    spec = runner.kv_spec
    scheduler: Scheduler[Req] = Scheduler(max_concurrent=max_concurrent, max_queue_size=64)
    if not hasattr(runner, "_test_kv"):
        runner._test_kv = BlockManager(  # type: ignore[attr-defined]
            num_blocks=spec.num_blocks,
            block_size=spec.block_size,
            cache_key=spec.cache_key,
            prefix_caching=spec.prefix_caching,
        )
    scheduler.kv = runner._test_kv  # type: ignore[attr-defined]  # the pool outlives one drive
    reqs: dict[int, Req] = {}
    run = Run({}, {})
    step = 0
    while step <= max(joins) or scheduler.has_work:
        for i in joins.get(step, []):
            rid = rid_base + i
            reqs[rid] = Req(rid=rid, arrival=step, prompt_ids=prompts[i], max_new=max_new(i))
            scheduler.add(reqs[rid], step)
        plan = scheduler.schedule(step)
        run.preemptions += len(plan.preempted)
        batch = StepBatch(
            new=[new_sequence(r, plan.allocations.get(r.rid)) for r in plan.admitted],
            running=[r.rid for r in plan.running],
            released=[r.rid for r in plan.released + plan.preempted],
            grown=plan.grown,
        )
        tokens = runner.step(batch).tokens
        for r in plan.batch:
            if r.rid not in tokens:
                continue
            scheduler.note_computed(r, r.num_tokens)
            r.output_ids.append(tokens[r.rid])
            if len(r.output_ids) >= r.max_new:
                scheduler.finish(r, FinishReason.LENGTH, step)
        step += 1
    runner.step(
        StepBatch(new=[], running=[], released=[r.rid for r in scheduler.schedule(step).released])
    )
    run.outputs = {rid - rid_base: r.output_ids for rid, r in reqs.items()}
    run.cached = {rid - rid_base: r.num_cached_tokens for rid, r in reqs.items()}
    run.steps = step
    return run


def prompts_of(lengths: list[int], seed: int = 1) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 320, (n,), generator=generator).tolist() for n in lengths]


def test_greedy_equals_generate_while_sequences_join_and_leave(
    tiny_model: LlamaForCausalLM,
) -> None:
    prompts = prompts_of([5, 17, 3, 30, 9, 1, 22, 12])
    new_tokens = [12, 4, 9, 12, 2, 7, 12, 5]
    expected = {i: reference(tiny_model, p, new_tokens[i]) for i, p in enumerate(prompts)}
    runner = HFPagedRunner(tiny_model, num_blocks=64, block_size=4)

    got = drive(
        runner,
        prompts,
        joins={0: [0, 1, 2], 2: [3], 3: [4, 5], 7: [6], 9: [7]},
        max_new=lambda i: len(expected[i]),
    )

    assert got.outputs == expected


def test_a_later_request_reuses_a_cached_prefix_and_still_equals_generate(
    tiny_model: LlamaForCausalLM,
) -> None:
    system = prompts_of([24], seed=2)[0]  # 6 blocks of 4
    first = [*system, 7, 8, 9]
    runner = HFPagedRunner(tiny_model, num_blocks=64, block_size=4)
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
    tiny_model: LlamaForCausalLM, chunk: int
) -> None:
    prompts = prompts_of([40, 3, 57, 9], seed=3)
    expected = {i: reference(tiny_model, p, 10) for i, p in enumerate(prompts)}
    runner = HFPagedRunner(tiny_model, num_blocks=96, block_size=4, prefill_chunk=chunk)

    got = drive(runner, prompts, joins={0: [1], 1: [0], 3: [2, 3]}, max_new=lambda _: 10)

    assert got.outputs == expected
    # the running streams never stopped: every step produced a token for each decoding row
    assert got.steps >= (57 + chunk - 1) // chunk


class SpyBudget(PrefillBudget):
    """A budget that has learned prompt tokens are dear: 8 a step while streams decode."""

    def tokens(self, *, decoding: bool) -> int:
        return 8 if decoding else self.most

    def observe(self, seconds: float, *, decode_rows: int, prompt_tokens: int) -> None:
        self.seen.append((decode_rows, prompt_tokens))  # type: ignore[attr-defined]


def test_while_streams_decode_a_step_takes_the_budgets_prompt_tokens(
    tiny_model: LlamaForCausalLM,
) -> None:
    prompts = prompts_of([6, 57, 30], seed=6)
    expected = {i: reference(tiny_model, p, 12) for i, p in enumerate(prompts)}
    runner = HFPagedRunner(tiny_model, num_blocks=96, block_size=4, prefill_stall_limit=3.0)
    spy = SpyBudget(runner.prefill_chunk, 3.0)
    spy.seen = []  # type: ignore[attr-defined]
    runner._budget = spy

    got = drive(runner, prompts, joins={0: [0], 2: [1, 2]}, max_new=lambda _: 12)

    assert got.outputs == expected
    seen: list[tuple[int, int]] = spy.seen  # type: ignore[attr-defined]
    assert seen[0] == (0, 6)  # nothing decoding: the whole prompt
    beside_decode = [tokens for rows, tokens in seen if rows and tokens]
    assert max(beside_decode) == 8  # the two prompts, 8 tokens a step
    assert sum(beside_decode) == 57 + 30


def test_preempted_requests_resume_and_equal_generate(tiny_model: LlamaForCausalLM) -> None:
    """A pool far too small for all of them: the newest are preempted, recomputed later, and
    nobody's output changes."""
    prompts = prompts_of([10, 14, 7, 12, 9, 11], seed=4)
    expected = {i: reference(tiny_model, p, 24) for i, p in enumerate(prompts)}
    runner = HFPagedRunner(tiny_model, num_blocks=20, block_size=4)  # 80 tokens; 6 x 34 needed

    got = drive(runner, prompts, joins={0: [0, 1, 2, 3, 4, 5]}, max_new=lambda _: 24)

    assert got.outputs == expected
    assert got.preemptions > 0


def test_without_prefix_caching_nothing_is_reused(tiny_model: LlamaForCausalLM) -> None:
    prompt = prompts_of([20], seed=5)[0]
    runner = HFPagedRunner(tiny_model, num_blocks=32, block_size=4, prefix_caching=False)
    drive(runner, [prompt], joins={0: [0]}, max_new=lambda _: 3)
    again = drive(runner, [prompt], joins={0: [0]}, max_new=lambda _: 3, rid_base=10)
    assert again.cached == {0: 0}
    assert again.outputs[0] == reference(tiny_model, prompt, 3)

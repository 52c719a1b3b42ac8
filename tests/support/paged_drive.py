"""Driving a paged runner the way the engine does: the real scheduler and block manager admit by
blocks, hand out block tables and cached prefixes, grow and preempt. Shared by the tests (CPU)
and benchmarks/bench_paged_gpu.py (GPU); no pytest here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel

from chatqueue.engine.hf.paged import HFPagedRunner
from chatqueue.engine.hf.paged.decode import DecodeOptions
from chatqueue.engine.hf.paged.packed import PackedStep
from chatqueue.engine.runner import NewSequence, StepBatch
from chatqueue.scheduler import Request, Scheduler
from chatqueue.scheduler.blocks import Allocation, BlockManager
from chatqueue.types import FinishReason, SamplingParams
from tests.support import packed_reference, tiny_families

GREEDY = SamplingParams(temperature=0.0)


@dataclass(eq=False, slots=True, kw_only=True)
class Req(Request):
    params: SamplingParams = GREEDY
    max_new: int = 1
    steps_running: int = 0


MODES = ("packed", "apart", "tiled")


def make_paged(model: PreTrainedModel, mode: str, **kw: Any) -> HFPagedRunner:
    """A paged runner (on the CPU) with its decode rows packed into the model's forward
    ("packed"; the CPU's way), or its decode step apart with prompt steps through that step
    ("apart"; the GPU's way, eager here), those prompt steps' attention in tiles, table rows and
    ends as the GPU's kernel takes them ("tiled": the kernel's contract in torch)."""
    if mode == "packed":
        return HFPagedRunner(model, **kw)
    options = DecodeOptions(max_batch=8, compile=False, cuda_graphs=False)
    runner = HFPagedRunner(model, decode=options, context_window=256, **kw)
    assert runner._decode is not None and runner._packed is not None
    if mode == "tiled":
        runner._packed = PackedStep(
            model,
            runner.pool,
            runner._decode.step,
            max_len=256,
            max_rows=8,
            most_tokens=8 + runner.prefill_chunk,
            kernel=packed_reference,
            cuda_graphs=False,
        )
    return runner


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


def scenarios(model: PreTrainedModel, make: Callable[..., HFPagedRunner]) -> dict[str, bool]:
    """The scenarios of tests/integration/test_paged_runner.py on any model and device, each
    True where every greedy output equals `generate()`'s: requests joining and leaving (a prompt
    of 30 tokens, past a tiny model's window), a second turn and another user reusing cached
    prefixes, prompts in chunks of 5 beside decode, preemption and resume."""

    def expected(prompt: list[int], n: int) -> list[int]:
        return tiny_families.reference(model, prompt, n).tokens

    ok: dict[str, bool] = {}
    prompts = prompts_of([5, 17, 3, 30, 9, 1, 22, 12])
    new = [12, 4, 9, 12, 2, 7, 12, 5]
    want = {i: expected(p, new[i]) for i, p in enumerate(prompts)}
    got = drive(
        make(num_blocks=64, block_size=4),
        prompts,
        joins={0: [0, 1, 2], 2: [3], 3: [4, 5], 7: [6], 9: [7]},
        max_new=lambda i: len(want[i]),
    )
    ok["join_and_leave"] = got.outputs == want

    system = prompts_of([24], seed=2)[0]
    first = [*system, 7, 8, 9]
    runner = make(num_blocks=64, block_size=4)
    turn1 = drive(runner, [first], joins={0: [0]}, max_new=lambda _: 10)
    turn2 = [*first, *turn1.outputs[0], 11, 12, 13]
    both = [turn2, [*system, 5, 6]]
    want = {i: expected(p, 8) for i, p in enumerate(both)}
    got = drive(runner, both, joins={0: [0, 1]}, max_new=lambda i: len(want[i]), rid_base=10)
    ok["prefix_reuse"] = (
        turn1.outputs[0] == expected(first, 10)[: len(turn1.outputs[0])]
        and got.outputs == want
        and got.cached[1] == 24
    )

    prompts = prompts_of([40, 3, 57, 9], seed=3)
    want = {i: expected(p, 10) for i, p in enumerate(prompts)}
    got = drive(
        make(num_blocks=96, block_size=4, prefill_chunk=5),
        prompts,
        joins={0: [1], 1: [0], 3: [2, 3]},
        max_new=lambda i: len(want[i]),
    )
    ok["chunks_beside_decode"] = got.outputs == want

    prompts = prompts_of([10, 14, 7, 12, 9, 11], seed=4)
    want = {i: expected(p, 24) for i, p in enumerate(prompts)}
    got = drive(
        make(num_blocks=20, block_size=4),
        prompts,
        joins={0: [0, 1, 2, 3, 4, 5]},
        max_new=lambda i: len(want[i]),  # generate() stops at EOS; the drive does not
    )
    ok["preemption"] = got.outputs == want and got.preemptions > 0
    return ok

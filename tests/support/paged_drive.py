"""Driving a paged runner the way the engine does: the real scheduler and block manager admit by
blocks, hand out block tables and cached prefixes, grow and preempt. Shared by the tests (CPU)
and benchmarks/bench_paged_gpu.py (GPU); no pytest here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from chatqueue.engine.hf.paged import HFPagedRunner
from chatqueue.engine.runner import NewSequence, StepBatch
from chatqueue.scheduler import Request, Scheduler
from chatqueue.scheduler.blocks import Allocation, BlockManager
from chatqueue.types import FinishReason, SamplingParams

GREEDY = SamplingParams(temperature=0.0)


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

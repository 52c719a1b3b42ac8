"""Every transformers runner (batched, sequential, static cache, paged with its decode rows packed or
apart) honours StepBatch.masks (a tiny random Llama on the CPU): a masked
row samples only the tokens its mask allows, at every step, prefill included; the rows beside it
sample exactly what they sample without it."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from transformers import LlamaForCausalLM

from chatqueue.engine.hf.paged.decode import DecodeOptions
from chatqueue.engine.hf.paged.runner import HFPagedRunner
from chatqueue.engine.hf.runner import HFBatchedRunner, HFSequentialRunner
from chatqueue.engine.hf.static import StaticCacheRunner
from chatqueue.engine.runner import ModelRunner, NewSequence, StepBatch
from chatqueue.types import SamplingParams
from tests.integration.test_hf_runner import tiny_llama

ALLOWED = [17, 42, 99, 300]  # of the tiny model's 320
STEPS = 8
PROMPTS = {0: [5, 6, 7, 8], 1: [9, 10, 11]}
BLOCKS = {0: [1, 2, 3, 4], 1: [5, 6, 7, 8]}  # the paged runner's: 16 tokens each, enough

RUNNERS: dict[str, Callable[[LlamaForCausalLM], ModelRunner]] = {
    "batched": HFBatchedRunner,
    "sequential": HFSequentialRunner,
    "static": lambda m: StaticCacheRunner(model=m, max_batch=4, max_len=64, use_cuda_graphs=False),
    "paged": lambda m: HFPagedRunner(m, num_blocks=16, block_size=4, prefix_caching=False),
    "paged-apart": lambda m: HFPagedRunner(
        m,
        num_blocks=16,
        block_size=4,
        prefix_caching=False,
        context_window=64,
        decode=DecodeOptions(max_batch=4, compile=False, cuda_graphs=False),
    ),
}


def mask_of(ids: list[int], vocab: int = 320) -> bytes:
    words = [0] * ((vocab + 31) // 32)
    for i in ids:
        words[i // 32] |= 1 << (i % 32)
    return b"".join(w.to_bytes(4, "little") for w in words)


def run(
    runner: ModelRunner, rids: list[int], masked: set[int], params: SamplingParams
) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {rid: [] for rid in rids}
    new = [NewSequence(rid, PROMPTS[rid], params, block_table=BLOCKS[rid]) for rid in rids]
    running: list[int] = []
    for _ in range(STEPS):
        masks = {rid: mask_of(ALLOWED) for rid in masked}
        tokens = runner.step(StepBatch(new=new, running=running, released=[], masks=masks)).tokens
        for rid, token in tokens.items():
            out[rid].append(token)
        running, new = running + [n.rid for n in new], []
    runner.step(StepBatch(new=[], running=[], released=running))
    return out


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.mark.parametrize("kind", list(RUNNERS))
@pytest.mark.parametrize(
    "params", [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, seed=4)]
)
def test_a_masked_row_samples_only_allowed_tokens(
    model: LlamaForCausalLM, kind: str, params: SamplingParams
) -> None:
    together = run(RUNNERS[kind](model), [0, 1], masked={0}, params=params)
    alone = run(RUNNERS[kind](model), [1], masked=set(), params=params)
    assert len(together[0]) == STEPS and set(together[0]) <= set(ALLOWED)
    assert together[1] == alone[1]
    assert not set(alone[1]) <= set(ALLOWED), "the mask changed something"

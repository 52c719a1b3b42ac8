"""The llama.cpp runner decodes ahead: each step starts the next decode before it returns, and the
next step samples from it (llamacpp/runner.py). What that must not change: a failed decode
ahead fails the next step only, masks still bind, and a runner without it gives the same tokens.
The default model (SmolLM2-135M-Instruct's GGUF) on the CPU."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import torch

from chatqueue.config import Settings
from chatqueue.engine.hf.gguf_cache import default_gguf_path
from chatqueue.engine.llamacpp.context import ContextConfig, LlamaContext, LlamaCppError
from chatqueue.engine.llamacpp.runner import LlamaCppRunner
from chatqueue.engine.runner import NewSequence, StepBatch, allowed_ids
from chatqueue.types import SamplingParams
from tests.integration.test_hf_runner import drive
from tests.integration.test_runner_masks import mask_of

pytestmark = [pytest.mark.model, pytest.mark.timeout(300)]

GREEDY = SamplingParams(temperature=0.0)
SLOTS = 4


class Watched:
    """A LlamaContext whose decodes can be seen (the thread of each, and `done` released when
    each ends) and made to fail (`fail_at`: the decode of that number, counting from 1)."""

    def __init__(self, context: LlamaContext, fail_at: int | None = None) -> None:
        self.context = context
        self.batch = context.batch
        self.context_window = context.context_window
        self.threads: list[str] = []
        self.fail_at = fail_at
        self.done = threading.Semaphore(0)

    def decode(self) -> torch.Tensor:
        self.threads.append(threading.current_thread().name)
        try:
            if len(self.threads) == self.fail_at:
                raise LlamaCppError("llama_decode returned 1 (made to fail)")
            return self.context.decode()
        finally:
            self.done.release()

    def wait(self, decodes: int) -> None:
        for _ in range(decodes):
            assert self.done.acquire(timeout=60), "no decode ended"

    def keep_prefix(self, seq_id: int, length: int) -> bool:
        return self.context.keep_prefix(seq_id, length)

    def clear(self, seq_id: int) -> None:
        self.context.clear(seq_id)

    def close(self) -> None:
        self.context.close()


@pytest.fixture(scope="module")
def context() -> Iterator[LlamaContext]:
    ctx = LlamaContext(
        default_gguf_path(),
        ContextConfig(slots=SLOTS, context_window=512, batch_tokens=SLOTS + 256, threads=1),
    )
    yield ctx
    ctx.close()


def runner_over(context: Watched | LlamaContext, *, decode_ahead: bool = True) -> LlamaCppRunner:
    return LlamaCppRunner(
        context,  # type: ignore[arg-type]
        slots=SLOTS,
        prefill_chunk=256,
        decode_ahead=decode_ahead,
    )


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    from chatqueue.api.build import _tokenizer
    from chatqueue.engine.hf.gguf_cache import gguf_model

    settings = Settings()
    _, folder, name = gguf_model(settings.model, settings.cache)
    tokenizer = _tokenizer(settings, folder, name)
    return [tokenizer.encode(q) for q in ("What is 2+2? The answer", "Colors: red,", "Hello")]


def forget(runner: LlamaCppRunner, running: list[int]) -> None:
    """Release every sequence and let the runner settle, so that the next test starts clean."""
    runner.step(StepBatch(new=[], running=[], released=running))


def test_the_next_decode_runs_before_the_next_step_is_asked(
    context: LlamaContext, prompts: list[list[int]]
) -> None:
    watched = Watched(context)
    runner = runner_over(watched)
    here = threading.current_thread().name

    runner.step(StepBatch(new=[NewSequence(0, prompts[0], GREEDY)], running=[], released=[]))
    watched.wait(2)  # the prompt's, in the step, then the next token's, unasked

    assert watched.threads[0] == here and watched.threads[1] != here
    runner.step(StepBatch(new=[], running=[0], released=[]))
    watched.wait(1)
    # the step sampled from the decode ahead, decoded nothing itself, and started the next
    assert len(watched.threads) == 3 and watched.threads[2] != here
    forget(runner, [0])


def test_the_tokens_are_those_of_a_runner_that_waits_for_each_step(
    context: LlamaContext, prompts: list[list[int]]
) -> None:
    joins = {0: [0], 1: [1], 4: [2]}
    waiting = drive(
        runner_over(context, decode_ahead=False), prompts, joins=joins, max_new_tokens=12
    )
    ahead = drive(runner_over(context), prompts, joins=joins, max_new_tokens=12)
    # the first sequence runs alone at first, as it does without decoding ahead
    assert ahead[0][:1] == waiting[0][:1]
    assert len(waiting[0]) == len(ahead[0]) == 12
    # the same tokens but where llama.cpp's batching differs (a sequence joining a step later)
    # moves sums at the 1e-3 level: most of each reply agrees
    agree = sum(a == w for i in ahead for a, w in zip(ahead[i], waiting[i], strict=True))
    assert agree >= 0.75 * 36


def test_a_failed_decode_ahead_fails_the_next_step_and_no_other(
    context: LlamaContext, prompts: list[list[int]]
) -> None:
    alone = drive(runner_over(context), [prompts[0]], joins={0: [0]}, max_new_tokens=6)[0]
    watched = Watched(context, fail_at=2)  # the prompt's decode, then the one ahead fails
    runner = runner_over(watched)
    first = runner.step(
        StepBatch(new=[NewSequence(0, prompts[0], GREEDY)], running=[], released=[])
    )
    assert first.tokens == {0: alone[0]}

    with pytest.raises(LlamaCppError, match="made to fail"):
        runner.step(StepBatch(new=[], running=[0], released=[]))

    # the engine fails that request and releases it; a new one runs as on a fresh runner
    runner.step(StepBatch(new=[], running=[], released=[0]))
    again = drive(runner, [prompts[0]], joins={0: [0]}, max_new_tokens=6)[0]
    assert again == alone
    assert len(watched.threads) > 6


def test_masks_bind_the_rows_decoded_ahead(context: LlamaContext, prompts: list[list[int]]) -> None:
    allowed = [11, 2018, 30, 253]  # tokens the model would rarely pick
    mask = mask_of(allowed, vocab=context.vocab_size)
    assert allowed_ids(mask) == sorted(allowed)
    runner = runner_over(context)
    new = [NewSequence(0, prompts[1], GREEDY), NewSequence(1, prompts[1], GREEDY)]
    out: dict[int, list[int]] = {0: [], 1: []}
    running: list[int] = []
    for _ in range(6):
        batch = StepBatch(new=new, running=running, released=[], masks={0: mask})
        for rid, token in runner.step(batch).tokens.items():
            out[rid].append(token)
        running, new = running + [n.rid for n in new], []
    forget(runner, running)
    assert len(out[0]) == 6 and set(out[0]) <= set(allowed)
    assert not set(out[1]) <= set(allowed), "the mask bound the row beside it"

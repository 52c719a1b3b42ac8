"""One step in flight (`--overlap-steps on`, or auto where it pays; with the model in its own
process): the engine sends step k+1 before it handles step k's tokens. Checked here: the replies are the same
as one step at a time, through a real model process and a KV pool small enough to preempt; a
request that ends on a token the engine could not foresee (EOS) has its extra token dropped and
is released a step later; one that reaches its length, or follows a grammar, is never sent a step
past what it needs; nothing holds a slot or a block afterwards."""

from __future__ import annotations

import asyncio
import collections
import functools
import threading
import time

import pytest

from chatqueue import ChatQueue
from chatqueue.engine.mock import MockConfig, MockRunner, MockTokenizer
from chatqueue.engine.overlap import OverlapMode
from chatqueue.engine.process.runner import ProcessRunner
from chatqueue.engine.runner import StepBatch, StepOutput
from chatqueue.types import ChatMessage, GrammarSpec, SamplingParams


class RecordingRunner(MockRunner):
    """The mock, pipelined in-process: a step runs when it is sent, its output waits to be read.
    `log` holds ("send", batch) and ("recv", None) in the order the engine called them."""

    def __init__(self, config: MockConfig) -> None:
        super().__init__(config)
        self.log: list[tuple[str, StepBatch | None]] = []
        self._outputs: collections.deque[StepOutput] = collections.deque()
        self._blocks: dict[int, int] = {}  # rid -> blocks in its table (with a pool)
        self._written: dict[int, int] = {}  # rid -> tokens whose KV a step has written

    def send_step(self, batch: StepBatch) -> None:
        self.log.append(("send", batch))
        if self.config.kv_blocks is not None:
            self._check_room(batch)
        self._outputs.append(super().step(batch))

    def _check_room(self, batch: StepBatch) -> None:
        """Every token a step writes has a slot in the blocks the scheduler gave its row."""
        for rid in batch.released:
            self._blocks.pop(rid, None)
            self._written.pop(rid, None)
        for new in batch.new:
            self._blocks[new.rid] = len(new.block_table)
            self._written[new.rid] = len(new.prompt_ids)
        for rid, added in batch.grown.items():
            self._blocks[rid] += len(added)
        for rid in batch.running:
            self._written[rid] += 1  # the token it sampled last, fed now
        for rid in [n.rid for n in batch.new] + list(batch.running):
            room = self._blocks[rid] * self.config.kv_block_size
            assert self._written[rid] <= room, f"request {rid} writes past its blocks"

    def recv_step(self) -> StepOutput:
        self.log.append(("recv", None))
        return self._outputs.popleft()

    def step(self, batch: StepBatch) -> StepOutput:
        self.send_step(batch)
        return self.recv_step()

    def most_unread(self) -> int:
        unread = most = 0
        for kind, _ in self.log:
            unread += 1 if kind == "send" else -1
            most = max(most, unread)
        return most

    def batches(self) -> list[StepBatch]:
        return [batch for kind, batch in self.log if batch is not None]


def words(prefix: str, n: int) -> str:
    return " ".join(f"{prefix}{i}" for i in range(n))


async def replies(cq: ChatQueue, asks: list[tuple[str, SamplingParams]]) -> list[tuple[str, str]]:
    await cq.start_queue_worker()
    await cq.wait_ready(60)
    try:
        streams = [await cq.submit([ChatMessage("user", text)], params) for text, params in asks]
        done = await asyncio.wait_for(asyncio.gather(*(s.collect() for s in streams)), 60)
        load = cq.load()
        assert load.processing == 0 and load.waiting == 0
        assert load.kv_blocks_used in (None, 0)  # every block back in the pool
        return [(d.text, d.reason.value) for d in done]
    finally:
        await cq.stop()


async def test_the_next_step_is_sent_before_the_last_one_is_read() -> None:
    runner = RecordingRunner(MockConfig(mode="echo"))
    cq = ChatQueue(runner, max_concurrent=4, max_queue_size=8, overlap_steps="on")
    got = await replies(cq, [(words("a", 5), SamplingParams()), (words("b", 9), SamplingParams())])
    assert got == [(words("a", 5), "stop"), (words("b", 9), "stop")]
    assert runner.most_unread() == 2  # step k+1 went out while k was unread, never more
    # "a" ends on EOS at its 6th step; the step sent after it still runs it (its token dropped),
    # and the one after that releases it
    batches = runner.batches()
    rid_a = batches[0].new[0].rid
    ran = [
        i for i, b in enumerate(batches) if rid_a in b.running or rid_a in {n.rid for n in b.new}
    ]
    assert len(ran) == 5 + 1 + 1  # five words, EOS, the dropped one
    released = next(i for i, b in enumerate(batches) if rid_a in b.released)
    assert released == ran[-1] + 1


async def test_one_step_at_a_time_when_overlap_is_off() -> None:
    runner = RecordingRunner(MockConfig(mode="echo"))
    cq = ChatQueue(runner, max_concurrent=4, max_queue_size=8, overlap_steps="off")
    got = await replies(cq, [(words("a", 5), SamplingParams())])
    assert got == [(words("a", 5), "stop")]
    assert runner.most_unread() == 1
    assert cq.metrics.registry.get_sample_value("chatqueue_steps_overlapped") == 0


async def test_a_request_is_never_sent_a_step_past_its_length() -> None:
    runner = RecordingRunner(MockConfig(mode="echo"))
    cq = ChatQueue(runner, max_concurrent=4, max_queue_size=8, overlap_steps="on")
    asks = [(words("a", 20), SamplingParams(max_tokens=3)), (words("b", 20), SamplingParams())]
    got = await replies(cq, asks)
    assert got == [(words("a", 3), "length"), (words("b", 20), "stop")]
    rid_a = runner.batches()[0].new[0].rid
    steps_of_a = [
        b for b in runner.batches() if rid_a in b.running or rid_a in {n.rid for n in b.new}
    ]
    assert len(steps_of_a) == 3  # its KV never runs past its budget
    assert runner.most_unread() == 2


async def test_a_grammar_row_waits_for_its_token_before_the_next_step() -> None:
    runner = RecordingRunner(MockConfig(mode="echo"))
    cq = ChatQueue(runner, max_concurrent=4, max_queue_size=8, overlap_steps="on")
    params = SamplingParams(max_tokens=12, grammar=GrammarSpec("json_object"))
    await replies(cq, [("say json", params)])
    assert runner.most_unread() == 1  # its next mask needs the token it has just sampled


async def test_the_blocks_of_a_row_always_hold_what_its_step_writes() -> None:
    # 16 blocks of 4 tokens for 4 requests of 9-16 prompt tokens and as many reply tokens
    runner = RecordingRunner(MockConfig(mode="echo", kv_blocks=16, kv_block_size=4))
    cq = ChatQueue(runner, max_concurrent=4, max_queue_size=64, overlap_steps="on")
    texts = [words(f"r{n}w", 6 + n % 8) for n in range(12)]
    got = await replies(cq, [(text, SamplingParams()) for text in texts])
    assert [text for text, _ in got] == texts
    assert runner.most_unread() == 2


class ChangingPace(RecordingRunner):
    """A model whose steps take no time, then 30 ms, then no time again: auto turns the overlap
    on, off and on again while requests run."""

    def send_step(self, batch: StepBatch) -> None:
        n = len(self.batches())
        time.sleep(0.03 if 40 <= n < 80 else 0.0)
        super().send_step(batch)


async def test_auto_turns_the_overlap_on_and_off_while_requests_run() -> None:
    runner = ChangingPace(MockConfig(mode="echo", kv_blocks=64, kv_block_size=4))
    cq = ChatQueue(runner, max_concurrent=4, max_queue_size=64, overlap_steps="auto")
    texts = [words(f"r{n}w", 40 + n) for n in range(16)]  # some 170 steps, 4 at a time
    got = await replies(cq, [(text, SamplingParams()) for text in texts])
    assert got == [(text, "stop") for text in texts]
    unread, modes = 0, []  # at each send: was a step still unread (overlap on) or not
    for kind, _ in runner.log:
        if kind == "send":
            modes.append(unread > 0)
        unread += 1 if kind == "send" else -1
    assert modes[10:40].count(True) > 20  # on while the steps took no time
    assert modes[60:80].count(True) < 5  # off once they took 30 ms
    assert modes[110:].count(True) > 10  # on again
    assert cq.metrics.registry.get_sample_value("chatqueue_steps_overlapped") == 1


class HangsAfter(RecordingRunner):
    """A model (in this process, so never restarted) that stops answering after `steps` steps,
    until `resume` is set."""

    def __init__(self, config: MockConfig, steps: int) -> None:
        super().__init__(config)
        self.steps, self.resume = steps, threading.Event()

    def recv_step(self) -> StepOutput:
        if sum(kind == "recv" for kind, _ in self.log) >= self.steps:
            self.resume.wait(30)
        return super().recv_step()


async def test_a_hang_with_two_steps_in_flight_ends_each_request_once() -> None:
    runner = HangsAfter(MockConfig(mode="echo"), steps=4)
    cq = ChatQueue(
        runner, max_concurrent=4, max_queue_size=8, overlap_steps="on", step_timeout_s=0.3
    )
    await cq.start_queue_worker()
    await cq.wait_ready(60)
    try:
        streams = [await cq.submit([ChatMessage("user", words(w, 40))]) for w in "ab"]
        done = await asyncio.wait_for(asyncio.gather(*(s.collect() for s in streams)), 30)
        assert [d.reason.value for d in done] == ["error", "error"]
        assert runner.most_unread() == 2  # the hang caught two steps in flight
        ended = cq.metrics.registry.get_sample_value(
            "chatqueue_finished_requests_total", {"reason": "error"}
        )
        assert ended == 2  # each request told once
    finally:
        runner.resume.set()
        await cq.stop()


@pytest.mark.parametrize("overlap", ["on", "off"])
async def test_through_a_model_process_under_preemption_the_replies_are_whole(
    overlap: OverlapMode,
) -> None:
    # block_size 4 and 16 blocks (64 tokens) for 6 requests of 9-16 prompt tokens and as many
    # reply tokens: decode runs out of blocks and preempts
    config = MockConfig(mode="echo", delay_s=0.002, kv_blocks=16, kv_block_size=4)
    load = functools.partial(MockRunner, config)
    runner = functools.partial(ProcessRunner, load, tokenizer=MockTokenizer(), model_name="mock")
    cq = ChatQueue(runner, max_concurrent=6, max_queue_size=64, overlap_steps=overlap)
    texts = [words(f"r{n}w", 6 + n % 8) for n in range(30)]
    stops = {n: SamplingParams(stop=(f"r{n}w4",)) for n in range(0, 30, 5)}
    asks = [(text, stops.get(n, SamplingParams())) for n, text in enumerate(texts)]
    got = await replies(cq, asks)
    want = [
        (words(f"r{n}w", 4), "stop") if n in stops else (text, "stop")
        for n, text in enumerate(texts)
    ]
    assert [(t.strip(), f) for t, f in got] == want
    preempted = cq.metrics.registry.get_sample_value("chatqueue_preemptions_total")
    assert preempted is not None and preempted > 0  # the pool did run short

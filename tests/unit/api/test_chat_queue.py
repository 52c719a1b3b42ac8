"""The embedding API in-process: ChatQueue over the mock runner, no network."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import Response

from chatqueue import (
    ChatMessage,
    ChatQueue,
    Finished,
    FinishInfo,
    FinishReason,
    MockConfig,
    MockRunner,
    Queued,
    SamplingParams,
    Started,
    Token,
)
from chatqueue.engine.runner import RunnerLost, StepBatch, StepOutput
from chatqueue.errors import (
    InvalidRequest,
    PromptTooLong,
    QueueFull,
    QueueTimeout,
    ServiceUnavailable,
    ShuttingDown,
)
from chatqueue.server.errors import headers_of

HELLO = [ChatMessage("user", "one two three four")]


def queue(**kw: object) -> ChatQueue:
    cfg = kw.pop("config", MockConfig())
    return ChatQueue(MockRunner(cfg), **kw)  # type: ignore[arg-type]


async def test_submit_streams_typed_events_and_calls_on_finish() -> None:
    seen: list[FinishInfo] = []
    cq = queue(on_finish=seen.append)
    await cq.start_queue_worker()
    stream = await cq.submit(HELLO)
    events = [e async for e in stream]
    assert isinstance(events[0], Started)
    assert "".join(e.text for e in events if isinstance(e, Token)) == "one two three four"
    done = events[-1]
    assert isinstance(done, Finished) and done.reason is FinishReason.STOP
    assert done.usage.completion_tokens == 4 and done.text == "one two three four"
    assert [i.reason for i in seen] == [FinishReason.STOP]
    await cq.stop()


async def test_waiting_request_gets_its_position_then_runs() -> None:
    cq = queue(max_concurrent=1, max_queue_size=2, config=MockConfig(delay_s=0.01))
    await cq.start_queue_worker()
    first = await cq.submit(HELLO)
    second = await cq.submit(HELLO)
    events = [e async for e in second]
    assert isinstance(events[0], Queued) and events[0].position == 1
    assert isinstance(events[-1], Finished) and events[-1].reason is FinishReason.STOP
    assert (await first.collect()).reason is FinishReason.STOP
    await cq.stop()


async def test_closing_a_stream_aborts_and_frees_the_slot() -> None:
    seen: list[FinishInfo] = []
    cq = queue(
        max_concurrent=1,
        max_queue_size=1,
        config=MockConfig(mode="lorem", lorem_tokens=10_000, delay_s=0.001),
        on_finish=seen.append,
    )
    await cq.start_queue_worker()
    running = await cq.submit(HELLO)
    assert isinstance(await anext(running), Started)  # it holds the slot
    waiting = await cq.submit(HELLO)
    assert cq.load().waiting == 1
    await waiting.aclose()  # leaves the queue at once
    assert cq.load().waiting == 0
    async for event in running:
        if isinstance(event, Token):
            break
    await running.aclose()
    for _ in range(500):  # the slot frees at the next step
        if cq.load().processing == 0:
            break
        await asyncio.sleep(0.01)
    assert cq.load().processing == 0
    assert sorted(i.reason for i in seen) == [FinishReason.ABORT, FinishReason.ABORT]
    await cq.stop()


async def test_full_queue_refuses_with_retry_after() -> None:
    cq = queue(max_concurrent=1, max_queue_size=1, config=MockConfig(delay_s=0.05))
    await cq.start_queue_worker()
    await cq.submit(HELLO)
    await cq.submit(HELLO)
    with pytest.raises(QueueFull) as exc:
        await cq.submit(HELLO)
    assert headers_of(exc.value)["Retry-After"] == "1"
    await cq.stop(timeout_s=0)


async def test_prompt_over_the_context_window_is_refused_with_both_numbers() -> None:
    cq = queue(config=MockConfig(context_window=8))
    await cq.start_queue_worker()
    with pytest.raises(PromptTooLong) as exc:
        await cq.submit(HELLO, SamplingParams(max_tokens=4))
    assert (
        "context window is 8" in exc.value.message and "7 in the prompt" in exc.value.message
    )  # <user> 4 words <end> <assistant>
    await cq.stop()


async def test_stop_drains_then_refuses() -> None:
    cq = queue(config=MockConfig(delay_s=0.01))
    await cq.start_queue_worker()
    stream = await cq.submit(HELLO)
    await cq.stop(timeout_s=10)
    assert (await stream.collect()).reason is FinishReason.STOP
    with pytest.raises(ShuttingDown):
        await cq.submit(HELLO)


async def test_stop_past_its_timeout_aborts_running_and_waiting() -> None:
    cfg = MockConfig(mode="lorem", lorem_tokens=100_000, delay_s=0.001)
    cq = queue(max_concurrent=1, max_queue_size=1, config=cfg)
    await cq.start_queue_worker()
    running, waiting = await cq.submit(HELLO), await cq.submit(HELLO)
    await cq.stop(timeout_s=0.05)
    assert (await running.collect()).reason is FinishReason.ABORT
    last = await waiting.collect()
    assert last.reason is FinishReason.ERROR and isinstance(last.error, ShuttingDown)


class ExplodingRunner(MockRunner):
    def step(self, batch: StepBatch) -> StepOutput:
        if batch.new and any(len(n.prompt_ids) > 8 for n in batch.new):
            raise RuntimeError("boom")
        return super().step(batch)


async def test_a_failed_step_fails_its_requests_and_the_worker_carries_on() -> None:
    cq = ChatQueue(ExplodingRunner())
    await cq.start_queue_worker()
    bad = await cq.submit([ChatMessage("user", "a b c d e f g h i j k")])
    done = await bad.collect()
    assert done.reason is FinishReason.ERROR and "boom" in str(done.error)
    ok = await cq.submit([ChatMessage("user", "fine")])
    assert (await ok.collect()).text == "fine"
    assert cq.load().processing == 0
    await cq.stop()


async def test_handle_chat_stream_request_in_a_users_own_app() -> None:
    cq = queue()
    app = FastAPI()

    @app.post("/my-chat")
    async def chat(request: Request) -> Response:
        return await cq.handle_chat_stream_request(request)

    await cq.start_queue_worker()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        r = await client.post(
            "/my-chat", json={"messages": [{"role": "user", "content": "hi you"}]}
        )
        assert r.status_code == 200
        assert "event: token" in r.text and "event: done" in r.text
        bad = await client.post("/my-chat", json={"messages": []})
        assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    await cq.stop()


async def test_queue_deadline_fails_a_waiting_request_without_taking_a_slot() -> None:
    cfg = MockConfig(mode="lorem", lorem_tokens=100_000, delay_s=0.001)
    cq = queue(max_concurrent=1, max_queue_size=2, config=cfg, queue_timeout_s=30)
    await cq.start_queue_worker()
    running = await cq.submit(HELLO)
    waiting = await cq.submit(HELLO, queue_timeout_s=0.1)  # may only lower the server's 30 s
    done = await waiting.collect()
    assert done.reason is FinishReason.ERROR and isinstance(done.error, QueueTimeout)
    assert done.usage.completion_tokens == 0
    assert cq.load().processing == 1 and cq.load().waiting == 0
    await running.aclose()
    await cq.stop()


class HangingRunner(MockRunner):
    def __init__(self) -> None:
        super().__init__(MockConfig(delay_s=0.001))
        self.release = threading.Event()

    def step(self, batch: StepBatch) -> StepOutput:
        if any(len(n.prompt_ids) > 8 for n in batch.new):
            self.release.wait(30)
        return super().step(batch)


async def test_a_hung_step_fails_running_and_waiting_with_503_then_recovers() -> None:
    runner = HangingRunner()
    cq = ChatQueue(runner, max_concurrent=1, max_queue_size=2, step_timeout_s=0.2)
    await cq.start_queue_worker()
    hung = await cq.submit([ChatMessage("user", "a b c d e f g h i j k")])
    waiting = await cq.submit(HELLO)
    for stream in (hung, waiting):
        done = await asyncio.wait_for(stream.collect(), 10)
        assert done.reason is FinishReason.ERROR and isinstance(done.error, ServiceUnavailable)
    assert cq.health == "unhealthy"
    with pytest.raises(ServiceUnavailable):
        await cq.submit(HELLO)
    runner.release.set()
    for _ in range(500):
        if cq.health == "ready" and cq.load().processing == 0:
            break
        await asyncio.sleep(0.01)
    assert (await (await cq.submit(HELLO)).collect()).text == "one two three four"
    await cq.stop()


async def test_a_reader_too_far_behind_is_cut_and_its_slot_freed() -> None:
    cfg = MockConfig(mode="lorem", lorem_tokens=100_000, delay_s=0.001, context_window=200_000)
    cq = queue(max_concurrent=1, max_queue_size=0, config=cfg, max_unread_tokens=50)
    await cq.start_queue_worker()
    stream = await cq.submit(HELLO)  # never read while it generates
    for _ in range(500):
        if stream.is_lagging and cq.load().processing == 0:
            break
        await asyncio.sleep(0.01)
    assert stream.is_lagging and cq.load().processing == 0
    assert (await stream.collect()).reason is FinishReason.ABORT
    await cq.stop()


async def test_server_caps_on_max_tokens_and_prompt_tokens() -> None:
    cq = queue(max_tokens_cap=10, max_prompt_tokens=6)
    await cq.start_queue_worker()
    with pytest.raises(InvalidRequest, match="at most 10"):
        await cq.submit([ChatMessage("user", "x")], SamplingParams(max_tokens=11))
    with pytest.raises(InvalidRequest, match="at most 6"):
        await cq.submit(HELLO)  # 7 prompt tokens
    assert cq.load().waiting == 0 and cq.load().processing == 0
    await cq.stop()


async def test_a_blocked_event_loop_shows_in_the_lag_histogram() -> None:
    cq = queue()
    await cq.start_queue_worker()
    try:
        late = "chatqueue_event_loop_lag_seconds_bucket"
        registry = cq.metrics.registry

        def num_late() -> float:  # samples more than 100 ms late
            count = registry.get_sample_value("chatqueue_event_loop_lag_seconds_count") or 0.0
            return count - (registry.get_sample_value(late, {"le": "0.1"}) or 0.0)

        before = num_late()
        await asyncio.sleep(0)  # the sampler task runs up to its first timer
        # a handler that blocks the loop: the sampler's timer fires at least 0.2 s late
        time.sleep(0.3)  # noqa: ASYNC251
        for _ in range(500):
            if num_late() > before:
                break
            await asyncio.sleep(0.01)
        assert num_late() == before + 1
    finally:
        await cq.stop()


class LosesItsModel(MockRunner):
    """A model that is gone at its first step (as a model process that died)."""

    def step(self, batch: StepBatch) -> StepOutput:
        raise RunnerLost("The model process exited (killed by SIGKILL).")


async def test_stop_after_the_model_is_lost_returns_without_waiting_out_its_timeout() -> None:
    cq = ChatQueue(LosesItsModel(), max_model_restarts=0)
    await cq.start_queue_worker()
    finished = await (await cq.submit(HELLO)).collect()
    assert finished.reason is FinishReason.ERROR and cq.health == "failed"
    # A stop that waited for its grace period here (what a lost model left "running") would
    # outlast this safety net by far; a second stop (the app's lifespan after the signal
    # handler's drain) returns at once too.
    await asyncio.wait_for(cq.stop(timeout_s=3600), timeout=10)
    await asyncio.wait_for(cq.stop(timeout_s=3600), timeout=10)


class DiesOnce(MockRunner):
    """A model in its own process that dies at its first step (once `may_die` is set) and comes
    back when restarted."""

    def __init__(self) -> None:
        super().__init__(MockConfig())
        self.has_died = False
        self.may_die = threading.Event()
        self.restarted = threading.Event()

    def step(self, batch: StepBatch) -> StepOutput:
        if not self.has_died:
            assert self.may_die.wait(10)
            self.has_died = True
            raise RunnerLost("The model process exited (killed by SIGKILL).")
        return super().step(batch)

    def check_alive(self) -> None:
        pass

    def kill(self) -> None:
        pass

    def restart(self) -> None:
        self.restarted.set()


async def test_a_model_exit_is_never_seen_beside_the_ready_state_from_before_it() -> None:
    """/health said ok with the new `last_model_exit` while the engine had not yet begun its
    restart, so a client that waited for both sent a request and got 503 "restarting" (a CI
    run). Every read of the two, from every thread, is taken here: the clock is read throughout
    the engine's handling of the exit."""
    runner = DiesOnce()
    queues: list[ChatQueue] = []
    seen: list[tuple[str | None, str, bool]] = []

    def clock() -> float:
        if queues:
            cq = queues[0]
            seen.append((cq.last_model_exit, cq.health, runner.restarted.is_set()))
        return time.monotonic()

    queues.append(ChatQueue(runner, clock=clock, max_concurrent=1))
    cq = queues[0]
    await cq.start_queue_worker()
    try:
        running = await cq.submit(HELLO)
        waiting = await cq.submit(HELLO)  # keeps its place through the restart
        runner.may_die.set()
        assert (await running.collect()).reason is FinishReason.ERROR
        assert (await waiting.collect()).reason is FinishReason.STOP
        assert cq.health == "ready"
    finally:
        await cq.stop()
    exit_ = "exited (killed by SIGKILL)"
    assert cq.last_model_exit == exit_
    assert (exit_, "restarting", False) in seen  # the reads saw the exit while it restarted
    assert not [s for s in seen if s[0] == exit_ and s[1] == "ready" and not s[2]]

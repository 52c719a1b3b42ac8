"""Holding under load and faults, through the real HTTP stack: a burst of ten times capacity, a
thousand requests with clients walking away, fairness between users and keys, queue deadlines, a
runner that fails and one that hangs.

Orderings are forced by what the test has seen (a queued comment, a /load figure, a gate the
runner waits on), never by sleeping; time limits are only safety nets.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from chatqueue.engine.mock import MockConfig, MockRunner
from tests.support.http import (
    COMPLETIONS,
    SAFETY_S,
    OpenStream,
    assert_no_server_errors,
    error_of,
    has_content,
    is_queued,
    load,
    metric,
    metrics,
    sse_events,
    until,
    wait_load,
)
from tests.support.inprocess import FailingRunner, GatedRunner, HangingRunner, serving
from tests.support.outcomes import send, user_says
from tests.support.servers import Server, running_server

ADMIN = "admin-secret"
KEYS = {
    "sk-alice": {"name": "alice"},
    "sk-bob": {"name": "bob"},
    "sk-vip": {"name": "vip", "priority": 5},
    "sk-capped": {"name": "capped", "max_queue": 1},
}
# Echoed back one word a step: at 0.01 s a step it outlasts any test, which closes it itself.
LONG = " ".join(["w"] * 1500)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@asynccontextmanager
async def client_for(url: str, **kw: Any) -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=url, timeout=SAFETY_S, limits=limits, **kw) as c:
        yield c


# -- a burst of ten times capacity ------------------------------------------------------------
async def test_burst_of_ten_times_capacity_refuses_exactly_the_excess(tmp_path: Path) -> None:
    runner = GatedRunner(MockConfig(mode="echo"))
    with serving(runner, tmp_path=tmp_path, max_concurrent=4, max_queue_size=8) as url:
        async with client_for(url) as client, _opened_at_exit(runner):
            bodies = [user_says(f"burst {i} reply", stream=i % 2 == 0) for i in range(120)]
            tasks = [asyncio.create_task(send(client, b)) for b in bodies]
            # NOTE: the runner finishes no step until the gate opens, so nothing admitted can
            # finish and make room: exactly 4 + 8 get in, whatever the arrival order.
            async with asyncio.timeout(SAFETY_S):
                while sum(t.done() for t in tasks) < 120 - 12:
                    await asyncio.wait(
                        [t for t in tasks if not t.done()], return_when=asyncio.FIRST_COMPLETED
                    )
                now = await load(client)
            runner.gate.set()
            outcomes = await asyncio.gather(*tasks)
            idle = await wait_load(client, processing=0, waiting=0)
    refused = [o for o in outcomes if o.status == 429]
    admitted = [(b, o) for b, o in zip(bodies, outcomes, strict=True) if o.status == 200]
    # (the first step may have taken fewer than 4 if they arrived one by one)
    assert now["processing"] + now["waiting"] == 12 and now["processing"] <= 4
    assert len(refused) == 120 - 12 and len(admitted) == 12
    assert all(o.error and o.error["type"] == "queue_full" for o in refused)
    assert not [o for o in outcomes if o.status >= 500]
    for body, o in admitted:
        assert o.error is None and o.text == body["messages"][0]["content"]
        assert not body["stream"] or o.ends_with_done
    assert idle["state"] == "ready"


@asynccontextmanager
async def _opened_at_exit(runner: GatedRunner) -> AsyncIterator[None]:
    try:
        yield
    finally:
        runner.gate.set()  # a failed test must not leave the engine thread waiting


# -- a thousand requests, 30% of the clients walking away -----------------------------------
@pytest.fixture(scope="module")
def churn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    flags = (
        "--engine", "mock", "--mock-delay", "0.002", "--max-concurrent", "8",
        "--max-queue-size", "200", "--admin-key", ADMIN, "--log-level", "warning",
    )  # fmt: skip
    with running_server(*flags, tmp_path=tmp_path_factory.mktemp("churn")) as server:
        yield server


def num_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def debug_figures(url: str) -> dict[str, int]:
    async with client_for(url, headers=bearer(ADMIN)) as c:
        return dict((await load(c))["debug"])


KINDS = ("stream", "plain", "leave_first_event", "leave_first_token", "leave_plain")


async def one_churned(
    client: httpx.AsyncClient, i: int, kind: str, leave_after_s: float
) -> tuple[str, str]:
    """(kind, "completed" or "left"); a completed one must have its whole reply."""
    text = f"churn {i} reply"
    body = user_says(text, stream=kind not in ("plain", "leave_plain"))
    if kind in ("stream", "plain"):
        out = await send(client, body)
        assert out.status == 200 and out.text == text and out.error is None, out
        return kind, "completed"
    if kind == "leave_plain":
        try:
            r = await asyncio.wait_for(client.post(COMPLETIONS, json=body), leave_after_s)
        except TimeoutError:
            return kind, "left"
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == text
        return kind, "completed"
    async with client.stream("POST", COMPLETIONS, json=body) as r:
        assert r.status_code == 200
        async for event in sse_events(r):
            if event.is_done:
                return kind, "completed"
            if kind == "leave_first_event" or event.content:
                return kind, "left"  # leaving the block closes the connection
    raise AssertionError(f"stream {i} ended without [DONE]")


@pytest.mark.timeout(90)
async def test_a_thousand_requests_with_disconnects_leak_nothing(churn: Server) -> None:
    pid = churn.process.pid
    async with client_for(churn.url) as warm:
        assert (await send(warm, user_says("warm up", stream=True))).status == 200
    base_tasks = (await debug_figures(churn.url))["tasks"]
    base_fds = num_fds(pid)

    rng = random.Random(20261122)
    kinds = rng.choices(KINDS, weights=(35, 35, 10, 10, 10), k=1000)
    delays = [rng.uniform(0.001, 0.05) for _ in kinds]
    in_flight = asyncio.Semaphore(100)

    async with client_for(churn.url) as client:

        async def bounded(i: int) -> tuple[str, str]:
            async with in_flight:
                return await one_churned(client, i, kinds[i], delays[i])

        results = await asyncio.gather(*(bounded(i) for i in range(len(kinds))))

    left = [k for k, how in results if how == "left"]
    completed = len(results) - len(left)
    # every stream meant to leave did (a plain one may have had its answer first)
    assert all(how == "left" for k, how in results if k.startswith("leave_first"))

    async with client_for(churn.url, headers=bearer(ADMIN)) as ops:
        idle = await wait_load(ops, processing=0, waiting=0)
        text = await metrics(ops)
    assert idle["state"] == "ready"
    assert metric(text, "chatqueue_running_requests") == 0
    assert metric(text, "chatqueue_waiting_requests") == 0
    reasons = {
        r: metric(text, "chatqueue_finished_requests_total", reason=r)
        for r in ("stop", "length", "abort", "error")
    }
    total = sum(reasons.values())
    # NOTE: a plain client that gives up may leave before its request reached the queue; every
    # other request reached it and finished exactly once (warm-up included).
    assert reasons["error"] == 0 and reasons["length"] == 0
    assert reasons["stop"] >= completed + 1
    assert 1001 - left.count("leave_plain") <= total <= 1001
    assert metric(text, "chatqueue_rejected_requests_total", reason="queue_full") == 0

    async def tasks_back() -> bool:
        return (await debug_figures(churn.url))["tasks"] <= base_tasks

    async def fds_back() -> bool:
        return num_fds(pid) <= base_fds + 4

    await until(tasks_back, f"asyncio tasks never fell back to {base_tasks}")
    await until(fds_back, f"open fds never fell back near {base_fds}")
    assert_no_server_errors(churn.log())


# -- fairness, priority, per-key caps ----------------------------------------------------------
@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("keyed")
    keys = tmp / "keys.json"
    keys.write_text(json.dumps(KEYS))
    flags = (
        "--engine", "mock", "--mock-delay", "0.01", "--max-concurrent", "1",
        "--max-queue-size", "64", "--api-keys", str(keys),
    )  # fmt: skip
    with running_server(*flags, tmp_path=tmp) as server:
        yield server


@pytest.fixture(scope="module")
def open_fair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    flags = ("--engine", "mock", "--mock-delay", "0.01", "--max-concurrent", "1")
    with running_server(*flags, tmp_path=tmp_path_factory.mktemp("open_fair")) as server:
        yield server


@pytest.mark.parametrize("by", ["api key", "user field"])
async def test_one_request_of_another_user_starts_within_one_turn(
    by: str, keyed: Server, open_fair: Server
) -> None:
    srv = keyed if by == "api key" else open_fair
    a_headers, b_headers = (bearer("sk-alice"), bearer("sk-bob")) if by == "api key" else ({}, {})
    a_fields, b_fields = ({}, {}) if by == "api key" else ({"user": "a"}, {"user": "b"})
    a_text = " ".join(["a"] * 30)  # 0.3 s a request: 50 of them take 15 s, one at a time
    a_done: list[int] = []
    async with client_for(srv.url, headers=a_headers) as a, client_for(srv.url) as b:
        async with AsyncExitStack() as stack:
            a_streams = []
            for _ in range(50):
                s = await stack.enter_async_context(
                    OpenStream(a, user_says(a_text, stream=True, **a_fields))
                )
                await s.read_until(lambda e: True)  # in the queue, or running
                a_streams.append(s)

            async def read_a(i: int) -> None:
                await a_streams[i].read_to_end()
                a_done.append(i)

            readers = [asyncio.create_task(read_a(i)) for i in range(50)]
            b_out = await send(b, user_says("b asks", stream=True, **b_fields), headers=b_headers)
            num_a_done = len(a_done)
            for r in readers:
                r.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
        await wait_load(b, processing=0, waiting=0)
    assert b_out.status == 200 and b_out.text == "b asks" and b_out.ends_with_done
    assert b_out.positions and b_out.positions[0] <= 2
    assert num_a_done <= 50 - 3  # b finished before a's third-from-last


async def test_a_higher_priority_key_is_admitted_before_earlier_requests(keyed: Server) -> None:
    async with (
        client_for(keyed.url, headers=bearer("sk-alice")) as alice,
        client_for(keyed.url, headers=bearer("sk-vip")) as vip,
        AsyncExitStack() as stack,
    ):
        blocker = await stack.enter_async_context(OpenStream(alice, user_says(LONG, stream=True)))
        await blocker.read_until(has_content)
        waiting = []
        for _ in range(3):
            s = await stack.enter_async_context(OpenStream(alice, user_says(LONG, stream=True)))
            await s.read_until(is_queued)
            waiting.append(s)
        vip_stream = await stack.enter_async_context(
            OpenStream(vip, user_says("vip goes first", stream=True))
        )
        first = await vip_stream.read_until(is_queued)
        await blocker.close()
        vip_log = await vip_stream.read_to_end()
        after_vip = await load(alice)
        await stack.aclose()
        await wait_load(alice, processing=0, waiting=0)
    assert first.position == 1
    assert vip_log.text == "vip goes first" and vip_log.events[-1].is_done
    assert after_vip["waiting"] >= 2  # alice's earlier ones still wait (LONG: one runs at most)


async def test_a_keys_own_cap_refuses_its_holder_only(keyed: Server) -> None:
    async with (
        client_for(keyed.url, headers=bearer("sk-alice")) as alice,
        client_for(keyed.url, headers=bearer("sk-capped")) as capped,
        AsyncExitStack() as stack,
    ):
        blocker = await stack.enter_async_context(OpenStream(alice, user_says(LONG, stream=True)))
        await blocker.read_until(has_content)
        queued = await stack.enter_async_context(OpenStream(capped, user_says("one", stream=True)))
        await queued.read_until(is_queued)
        refused = await capped.post(COMPLETIONS, json=user_says("two", stream=False))
        other = await stack.enter_async_context(OpenStream(alice, user_says("x", stream=True)))
        await other.read_until(is_queued)
        await stack.aclose()
        await wait_load(alice, processing=0, waiting=0)
    assert refused.status_code == 429 and "retry-after" in refused.headers
    assert error_of(refused)["type"] == "user_queue_full"


# -- queue deadlines ----------------------------------------------------------------------------
async def test_requests_past_their_queue_deadline_get_503_or_an_error_chunk(
    tmp_path: Path,
) -> None:
    runner = MockRunner(MockConfig(mode="echo", delay_s=0.005))
    with serving(
        runner, tmp_path=tmp_path, max_concurrent=1, max_queue_size=8, queue_timeout_s=1.0
    ) as url:
        async with client_for(url) as client:
            async with OpenStream(client, user_says(LONG, stream=True)) as blocker:
                await blocker.read_until(has_content)
                plain, streamed, above_server = await asyncio.gather(
                    send(client, user_says("x", stream=False, queue_timeout=0.1)),
                    send(client, user_says("x", stream=True, queue_timeout=0.1)),
                    # may only lower the server's 1 s: it does not wait a minute
                    send(client, user_says("x", stream=False, queue_timeout=60)),
                )
            await wait_load(client, processing=0, waiting=0)
            text = await metrics(client)
    for out in (plain, above_server):
        assert out.status == 503 and out.error and out.error["type"] == "queue_timeout"
    assert streamed.status == 200 and streamed.text == ""
    assert streamed.error and streamed.error["type"] == "queue_timeout"
    assert streamed.ends_with_done and streamed.events[-2].data.get("error")
    assert metric(text, "chatqueue_finished_requests_total", reason="error") == 3


# -- faults in the runner -----------------------------------------------------------------------
async def test_a_failing_step_fails_only_its_requests(tmp_path: Path) -> None:
    runner = FailingRunner(MockConfig(mode="echo", delay_s=0.002))
    # NOTE: a step fails as a whole; one slot puts each request in a step of its own.
    with serving(runner, tmp_path=tmp_path, max_concurrent=1, max_queue_size=16) as url:
        async with client_for(url) as client:
            bodies = [
                user_says(text, stream=stream)
                for text in ("fine one", "boom here", "fine two")
                for stream in (True, False)
            ]
            outcomes = await asyncio.gather(*(send(client, b) for b in bodies))
            after = await send(client, user_says("still fine", stream=False))
            idle = await wait_load(client, processing=0, waiting=0)
            text = await metrics(client)
    for body, out in zip(bodies, outcomes, strict=True):
        said = body["messages"][0]["content"]
        if "boom" not in said:
            assert out.status == 200 and out.text == said and out.error is None
        elif body["stream"]:
            assert out.status == 200 and out.ends_with_done
            assert out.error and out.error["type"] == "engine_error"
        else:
            assert out.status == 500 and out.error and out.error["type"] == "engine_error"
    assert after.status == 200 and after.text == "still fine"
    assert idle["state"] == "ready"
    assert metric(text, "chatqueue_finished_requests_total", reason="error") == 2


async def test_a_hung_step_fails_waiting_and_running_and_health_says_unhealthy(
    tmp_path: Path,
) -> None:
    runner = HangingRunner(MockConfig(mode="echo", delay_s=0.002))
    # NOTE: the queue's clock jumps an hour when the test says so: the watchdog then finds the
    # step hung, however slowly the requests before that got in.
    skew = [0.0]
    with serving(
        runner,
        tmp_path=tmp_path,
        max_concurrent=1,
        max_queue_size=8,
        step_timeout_s=60.0,
        clock=lambda: time.monotonic() + skew[0],
    ) as url:
        async with client_for(url) as client:
            started = asyncio.Event()
            running = asyncio.create_task(
                send(client, user_says("hang on", stream=True), on_event=lambda e: started.set())
            )
            async with asyncio.timeout(SAFETY_S):
                await started.wait()
            waiting = [
                asyncio.create_task(send(client, user_says("w", stream=stream)))
                for stream in (True, False)
            ]
            await wait_load(client, processing=1, waiting=2)
            skew[0] = 3600.0
            async with asyncio.timeout(SAFETY_S):
                outs = await asyncio.gather(running, *waiting)
            health = await client.get("/health")
            while_hung = await send(client, user_says("new", stream=False))
            runner.release.set()
            await until(lambda: _is_healthy(client), "never healthy again")
            after = await send(client, user_says("after", stream=True))
            await wait_load(client, processing=0, waiting=0)
    assert health.status_code == 503 and health.json()["status"] == "unhealthy"
    for out in outs[:2]:  # running, and waiting, streamed: an error chunk, then [DONE]
        assert out.status == 200 and out.ends_with_done
        assert out.error and out.error["type"] == "service_unavailable"
    assert outs[2].status == 503 and outs[2].error
    assert while_hung.status == 503
    assert after.status == 200 and after.text == "after"


async def _is_healthy(client: httpx.AsyncClient) -> bool:
    return (await client.get("/health")).status_code == 200

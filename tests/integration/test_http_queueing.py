"""Queueing over real HTTP: interleaved streams, the bounded queue, disconnects, the ops routes.

Every ordering here is forced by what the test has already seen (a first token, a queued
comment, a /load figure), never by sleeping; time limits are only safety nets.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator

import httpx
import pytest

from tests.support.http import (
    COMPLETIONS,
    SAFETY_S,
    OpenStream,
    SseEvent,
    assert_no_server_errors,
    chat,
    error_of,
    has_content,
    is_queued,
    load,
    lorem,
    metric,
    metrics,
    read_stream,
    wait_load,
)
from tests.support.servers import Server, running_server

NUM_WORDS = 20
MAX_CONCURRENT = 2
MAX_QUEUE = 2


def mock_lorem(*, max_concurrent: int, max_queue: int, words: int, delay_s: float) -> list[str]:
    return [
        "--engine", "mock", "--mock-mode", "lorem", "--mock-lorem-tokens", str(words),
        "--mock-delay", str(delay_s),
        "--max-concurrent", str(max_concurrent), "--max-queue-size", str(max_queue),
    ]  # fmt: skip


# NOTE: every test here runs against one server process, and against two API servers over
# one core (--api-servers 2): the queue's promises are the same whichever process a client
# reaches.
API_SERVERS = [pytest.param(1, id="one-process"), pytest.param(2, id="two-api-servers")]


@pytest.fixture(scope="module", params=API_SERVERS)
def srv(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Server]:
    # NOTE: 0.05 s a step makes one generation last 1 s: long enough that a burst fired at once
    # all arrives while the first requests still run.
    flags = mock_lorem(
        max_concurrent=MAX_CONCURRENT, max_queue=MAX_QUEUE, words=NUM_WORDS, delay_s=0.05
    )
    flags += ["--api-servers", str(request.param)]
    with running_server(*flags, tmp_path=tmp_path_factory.mktemp("queueing")) as server:
        yield server


@pytest.fixture(scope="module", params=API_SERVERS)
def one_slot(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Server]:
    flags = mock_lorem(max_concurrent=1, max_queue=3, words=400, delay_s=0.01)
    flags += ["--api-servers", str(request.param)]
    with running_server(*flags, tmp_path=tmp_path_factory.mktemp("one_slot")) as server:
        yield server


@pytest.fixture
async def client(srv: Server) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=srv.url, timeout=SAFETY_S) as c:
        yield c
    srv.wait_idle()
    assert_no_server_errors(srv.log())


# -- interleaving --------------------------------------------------------------------------
async def test_two_streams_interleave_token_by_token_while_a_third_waits(
    client: httpx.AsyncClient,
) -> None:
    arrivals: list[tuple[str, int]] = []  # (stream, words in the chunk), in global order
    both_running = asyncio.Event()

    def record(name: str) -> Callable[[SseEvent], None]:
        def on_event(event: SseEvent) -> None:
            if event.content:
                arrivals.append((name, len(event.content.split())))
                if {"a", "b"} <= {n for n, _ in arrivals}:
                    both_running.set()

        return on_event

    async def third() -> tuple[list[int], dict[str, object], str]:
        await both_running.wait()
        async with OpenStream(client, chat(stream=True, max_tokens=3)) as c:
            first = await c.read_until(lambda e: e.comment is not None or e.data is not None)
            assert first.position == 1, f"the third request did not wait first: {first}"
            while_waiting = await load(client)
            await c.read_until(has_content)
            arrivals.append(("c", len(c.log.events[-1].content.split())))
            log = await c.read_to_end()
        return log.positions, while_waiting, log.text

    a, b, (c_positions, while_c_waits, c_text) = await asyncio.gather(
        read_stream(client, chat(stream=True), record("a")),
        read_stream(client, chat(stream=True), record("b")),
        third(),
    )

    assert a.text == b.text == lorem(NUM_WORDS)
    assert c_text == lorem(3)
    assert c_positions == [1]
    assert (while_c_waits["processing"], while_c_waits["waiting"]) == (2, 1)

    # One admitted a step after the other runs a constant `offset` tokens ahead; within a step
    # either token may land first, so the lead wobbles by one around that offset. A stream
    # that got two tokens ahead of its own pace would widen the spread past 2.
    words = {"a": 0, "b": 0, "c": 0}
    leads: list[int] = []
    for name, n in arrivals:
        words[name] += n
        if name == "c":
            assert NUM_WORDS in (words["a"], words["b"]), "c started before a slot was free"
            continue
        both_going = words["a"] and words["b"]
        if both_going and max(words["a"], words["b"]) < NUM_WORDS:
            leads.append(words["a"] - words["b"])
    assert len(leads) >= NUM_WORDS, f"the streams barely overlapped: {arrivals}"
    assert max(leads) - min(leads) <= 2, f"one stream ran ahead: {arrivals}"


async def test_queued_positions_fall_as_slots_free(one_slot: Server) -> None:
    async with httpx.AsyncClient(base_url=one_slot.url, timeout=SAFETY_S) as client:
        async with OpenStream(client, chat(stream=True)) as holder:
            await holder.read_until(has_content)
            # B and C end soon once they run; D watches the line move.
            waiters = [OpenStream(client, chat(stream=True, max_tokens=2)) for _ in range(3)]
            for w in waiters:
                await w.__aenter__()
                await w.read_until(is_queued)
            assert [w.log.positions for w in waiters] == [[1], [2], [3]]
        # the holder left: the slot frees and the line moves up one place at a time
        logs = [await w.read_to_end() for w in waiters]
        for w in waiters:
            await w.close()
        assert logs[2].positions == [3, 2, 1]
        assert [log.text for log in logs] == [lorem(2)] * 3
        assert logs[2].events[-1].is_done
    one_slot.wait_idle()
    assert_no_server_errors(one_slot.log())


# -- the bounded queue ---------------------------------------------------------------------
async def test_burst_past_the_bound_gets_exactly_the_excess_refused(
    client: httpx.AsyncClient,
) -> None:
    excess = 3
    before = await metrics(client)
    burst = MAX_CONCURRENT + MAX_QUEUE + excess

    responses = await asyncio.gather(
        *(client.post(COMPLETIONS, json=chat(stream=False)) for _ in range(burst))
    )

    refused = [r for r in responses if r.status_code == 429]
    served = [r for r in responses if r.status_code == 200]
    assert len(refused) == excess, [r.status_code for r in responses]
    assert len(served) == burst - excess, [r.status_code for r in responses]
    for r in refused:
        assert int(r.headers["Retry-After"]) >= 1
        assert error_of(r)["type"] == "queue_full"
    for r in served:
        body = r.json()
        assert body["choices"][0]["message"]["content"] == lorem(NUM_WORDS)
        assert body["choices"][0]["finish_reason"] == "stop"
    now = await wait_load(client, processing=0, waiting=0)
    assert now["max_processing"] == MAX_CONCURRENT and now["max_waiting"] == MAX_QUEUE
    after = await metrics(client)
    name = "chatqueue_rejected_requests_total"
    rejected = metric(after, name, reason="queue_full") - metric(before, name, reason="queue_full")
    assert rejected == excess


# -- clients that go away ------------------------------------------------------------------
async def test_streamed_client_leaving_while_running_frees_its_slot(
    client: httpx.AsyncClient,
) -> None:
    before = await metrics(client)
    async with OpenStream(client, chat(stream=True)) as s:
        await s.read_until(has_content)
        assert (await load(client))["processing"] == 1
    await wait_load(client, processing=0, waiting=0)
    after = await metrics(client)
    name = "chatqueue_finished_requests_total"
    assert metric(after, name, reason="abort") - metric(before, name, reason="abort") == 1
    assert metric(after, name, reason="stop") == metric(before, name, reason="stop")


async def test_streamed_client_leaving_while_waiting_leaves_the_queue(
    client: httpx.AsyncClient,
) -> None:
    async with (
        OpenStream(client, chat(stream=True)) as a,
        OpenStream(client, chat(stream=True)) as b,
    ):
        await a.read_until(has_content)
        await b.read_until(has_content)
        async with OpenStream(client, chat(stream=True)) as waiter:
            await waiter.read_until(is_queued)
            assert (await load(client))["waiting"] == 1
        now = await wait_load(client, waiting=0)
        assert now["processing"] == 2  # the running ones carry on


async def test_plain_client_leaving_while_running_frees_its_slot(
    client: httpx.AsyncClient,
) -> None:
    before = await metrics(client)
    task = asyncio.create_task(client.post(COMPLETIONS, json=chat(stream=False)))
    await wait_load(client, processing=1)
    task.cancel()  # httpx closes the connection under a cancelled request
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_load(client, processing=0, waiting=0)
    after = await metrics(client)
    name = "chatqueue_finished_requests_total"
    assert metric(after, name, reason="abort") - metric(before, name, reason="abort") == 1


async def test_plain_client_leaving_while_waiting_leaves_the_queue(
    client: httpx.AsyncClient,
) -> None:
    async with (
        OpenStream(client, chat(stream=True)) as a,
        OpenStream(client, chat(stream=True)) as b,
    ):
        await a.read_until(has_content)
        await b.read_until(has_content)
        task = asyncio.create_task(client.post(COMPLETIONS, json=chat(stream=False)))
        await wait_load(client, waiting=1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        now = await wait_load(client, waiting=0)
        assert now["processing"] == 2
        await a.close()
        await b.close()


# -- operations routes ---------------------------------------------------------------------
async def test_health(client: httpx.AsyncClient) -> None:
    response = await client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_load_and_metrics_follow_the_traffic(client: httpx.AsyncClient) -> None:
    before = await metrics(client)
    async with (
        OpenStream(client, chat(stream=True)) as a,
        OpenStream(client, chat(stream=True)) as b,
    ):
        await a.read_until(has_content)
        await b.read_until(has_content)
        waiter = OpenStream(client, chat(stream=True, max_tokens=3))
        async with waiter:
            await waiter.read_until(is_queued)
            busy = await load(client)
            during = await metrics(client)
            await a.close()  # frees the slots for the waiter
            await b.close()
            assert (await waiter.read_to_end()).text == lorem(3)
    idle = await wait_load(client, processing=0, waiting=0)
    after = await metrics(client)

    assert set(busy) >= {
        "processing", "waiting", "max_processing", "max_waiting", "tokens_per_s",
        "mean_queue_wait_s",
    }  # fmt: skip
    assert (busy["processing"], busy["waiting"]) == (2, 1)
    assert (busy["max_processing"], busy["max_waiting"]) == (MAX_CONCURRENT, MAX_QUEUE)
    assert busy["tokens_per_s"] > 0
    assert isinstance(idle["mean_queue_wait_s"], float) and idle["mean_queue_wait_s"] >= 0

    assert metric(during, "chatqueue_running_requests") == 2
    assert metric(during, "chatqueue_waiting_requests") == 1
    assert metric(after, "chatqueue_running_requests") == 0
    assert metric(after, "chatqueue_waiting_requests") == 0

    def moved(name: str) -> float:
        return metric(after, name) - metric(before, name)

    assert moved("chatqueue_queue_wait_seconds_count") == 3
    assert moved("chatqueue_time_to_first_token_seconds_count") == 3
    assert moved("chatqueue_generated_tokens_total") >= 2 + 3
    assert moved("chatqueue_queue_wait_seconds_sum") > 0  # the third one waited
    assert "# TYPE chatqueue_rejected_requests_total counter" in after


async def test_unknown_route_is_an_openai_error(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/nope")
    assert response.status_code == 404
    assert error_of(response)["type"] == "not_found"

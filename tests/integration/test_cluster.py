"""The cluster (chatqueue.cluster) on a real local Ray, started once for the module: two mock
replicas behind one Serve endpoint, each with N slots and q queue places, history in a real Redis.

The requests that must hold their places for a while ask for long echo replies (the mock engine
repeats the message word by word, a step each); every wait is on an event or a state, with a
safety net against hangs, never a fixed sleep."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import ray
from ray import serve

from chatqueue.api.outbox import decode
from chatqueue.api.wire import Admitted, Submission
from chatqueue.cluster import app_for
from chatqueue.cluster.leases import RENEW_EVERY_S
from chatqueue.cluster.policy import RouteHint
from chatqueue.cluster.wave import Wave
from chatqueue.config import Settings
from chatqueue.types import ChatMessage, Finished
from tests.support.chat import done_of, reply_text, sse_events
from tests.support.http import COMPLETIONS, SseEvent, StreamLog, metric
from tests.support.http import sse_events as sse_records
from tests.support.servers import Server, free_port, redis_server, running_server

N = 2  # slots a replica
Q = 2  # queue places a replica
REPLICAS = 2
SAFETY_S = 60.0  # Ray on two shared cores: a generous net against hangs, never a measurement
LONG = " ".join(f"w{i}" for i in range(100))  # a reply of 100 steps: 5 s at 50 ms a step
SECRET = "cluster-test-secret"

# Ray and Serve start once for the module (about half a minute on two cores), in the first test.
pytestmark = pytest.mark.timeout(300)


@dataclass
class Cluster:
    url: str
    redis_url: str
    server: Server  # `chatqueue serve --replicas 2`, the front in its own process
    proxy_url: str  # Serve's HTTP proxy, for the Serve front deployed beside


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The test's own Ray (so that it can reach the replicas through a handle of its own, and
    deploy the Serve front beside), joined by `chatqueue serve --replicas 2 --ray-address`."""
    tmp = tmp_path_factory.mktemp("cluster")
    with redis_server() as redis_url:
        ray_info = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            proxy_port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": proxy_port})
            address = ray_info.address_info["gcs_address"]
            args = (
                "--engine", "mock", "--mock-delay", "0.05", "--replicas", str(REPLICAS),
                "--replica-cpus", "0.1", "--max-concurrent", str(N), "--max-queue-size", str(Q),
                "--history", redis_url, "--shutdown-timeout", "30", "--ray-address", address,
                "--data-dir", str(tmp),
            )  # fmt: skip
            env = {"CHATQUEUE_SESSION_SECRET": SECRET}
            with running_server(*args, tmp_path=tmp, env=env, ready_timeout_s=240) as server:
                asyncio.run(_until_ready(server.url))
                yield Cluster(server.url, redis_url, server, f"http://127.0.0.1:{proxy_port}")
        finally:
            serve.shutdown()
            ray.shutdown()


async def _until_ready(url: str) -> None:
    async with httpx.AsyncClient(base_url=url) as client:
        await until(lambda: _ready_replicas(client, REPLICAS), "the replicas never got ready")


async def _ready_replicas(client: httpx.AsyncClient, num: int) -> bool:
    try:
        if (await client.get("/health")).status_code != 200:
            return False
    except httpx.TransportError:
        return False
    rows = (await client.get("/load")).json()["replicas"]
    return sum(1 for r in rows if r["state"] == "ready") == num


async def until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + SAFETY_S
    while not await check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


@asynccontextmanager
async def client_of(cluster: Cluster) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=cluster.url, timeout=SAFETY_S) as client:
        await until(lambda: _ready_replicas(client, REPLICAS), "the replicas are not both ready")
        await until(lambda: _idle(client), "the cluster is not idle")
        yield client


async def _idle(client: httpx.AsyncClient) -> bool:
    """Every replica has figures, and none holds a request."""
    rows = (await client.get("/load")).json()["replicas"]
    held = [r.get("running", 1) + r.get("waiting", 1) for r in rows]
    return len(rows) == REPLICAS and not any(held)


def long_body() -> dict[str, Any]:
    return body_of(LONG)


def body_of(text: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], "stream": True}


class Stream:
    """A streamed chat completion the test holds open and reads as far as it likes."""

    def __init__(self, client: httpx.AsyncClient, body: dict[str, Any]) -> None:
        self._cm = client.stream("POST", COMPLETIONS, json=body)
        self.log = StreamLog()
        self.response: httpx.Response | None = None
        self._records: AsyncIterator[SseEvent] | None = None

    async def open(self) -> Stream:
        self.response = await self._cm.__aenter__()
        self.log.status = self.response.status_code
        if self.response.status_code == 200:
            self._records = sse_records(self.response)
        else:
            await self.response.aread()
        return self

    async def read_until(self, is_wanted: Callable[[SseEvent], bool]) -> None:
        assert self._records is not None
        async with asyncio.timeout(SAFETY_S):
            async for event in self._records:
                self.log.events.append(event)
                if is_wanted(event):
                    return
        raise AssertionError(f"the stream ended first: {self.log}")

    async def read_to_end(self) -> StreamLog:
        if self._records is not None:
            async with asyncio.timeout(SAFETY_S):
                async for event in self._records:
                    self.log.events.append(event)
        await self._cm.__aexit__(None, None, None)
        return self.log

    async def close(self) -> None:
        """The client goes away."""
        await self._cm.__aexit__(None, None, None)

    @property
    def was_queued(self) -> bool:
        return bool(self.log.positions)

    @property
    def error(self) -> dict[str, Any] | None:
        return next((c["error"] for c in self.log.chunks if "error" in c), None)


def has_content(event: SseEvent) -> bool:
    return bool(event.content)


def is_started(event: SseEvent) -> bool:
    """The role chunk: the request has its slot."""
    return isinstance(event.data, dict) and bool(event.data.get("choices"))


async def start_on_free_slots(client: httpx.AsyncClient, num: int) -> list[Stream]:
    """`num` long streams, each opened once the one before it has its slot."""
    streams = []
    for _ in range(num):
        stream = await Stream(client, long_body()).open()
        await stream.read_until(lambda e: is_started(e) or e.position is not None)
        streams.append(stream)
    return streams


async def test_a_burst_gets_exactly_k_429s_and_the_waiting_see_their_positions_fall(
    cluster: Cluster,
) -> None:
    """2x(N+q)+k at once: every replica's places fill, exactly k are refused (each with a
    Retry-After), all the others complete; the waiting ones' positions only ever fall."""
    k = 3
    async with client_of(cluster) as client:
        streams = [Stream(client, long_body()) for _ in range(REPLICAS * (N + Q) + k)]
        await asyncio.gather(*(s.open() for s in streams))
        refused = [s for s in streams if s.log.status == 429]
        assert len(refused) == k, [s.log.status for s in streams]
        for s in refused:
            assert s.response is not None
            assert int(s.response.headers["Retry-After"]) >= 1
            assert s.response.json()["error"]["type"] == "queue_full"
        admitted = [s for s in streams if s.log.status == 200]
        logs = await asyncio.gather(*(s.read_to_end() for s in admitted))
        assert all(log.text == LONG and log.events[-1].is_done for log in logs)
        waited = [log.positions for log in logs if log.positions]
        assert len(waited) == REPLICAS * Q, "the queued requests said where they stood"
        for positions in waited:
            assert positions == sorted(positions, reverse=True), positions
            assert positions[-1] == 1 or len(positions) == 1


async def test_no_request_waits_while_another_replica_has_a_free_slot(cluster: Cluster) -> None:
    """One after another, REPLICAS x N long requests: every one finds a free slot (half land on
    each replica), and only the next one waits. The router counts what it sent since a replica's
    stats were sampled, so stats up to a period old (0.5 s) cannot send two to one slot."""
    async with client_of(cluster) as client:
        streams = await start_on_free_slots(client, REPLICAS * N)
        assert not any(s.was_queued for s in streams), [s.log.positions for s in streams]
        one_more = await start_on_free_slots(client, 1)
        assert one_more[0].was_queued
        for s in [*streams, *one_more]:
            assert (await s.read_to_end()).text == LONG


async def test_a_burst_that_fits_the_free_slots_waits_nowhere(cluster: Cluster) -> None:
    """REPLICAS x N requests at once: the front places them in waves split by free slots, so
    every one starts at once on one replica or the other, and none is queued."""
    async with client_of(cluster) as client:
        streams = [Stream(client, long_body()) for _ in range(REPLICAS * N)]
        await asyncio.gather(*(s.open() for s in streams))
        assert all(s.log.status == 200 for s in streams), [s.log.status for s in streams]
        for s in streams:
            await s.read_until(lambda e: is_started(e) or e.position is not None)
        assert not any(s.was_queued for s in streams), [s.log.positions for s in streams]
        logs = await asyncio.gather(*(s.read_to_end() for s in streams))
        assert all(log.text == LONG for log in logs)


async def test_a_client_that_goes_away_frees_its_place_for_the_next(cluster: Cluster) -> None:
    """Every place held by replies far longer than the test: the client of one goes away, its
    replica aborts it (the front's abort call), and a new request is taken in its place while
    the others still hold theirs."""
    hold = {"messages": [{"role": "user", "content": LONG * 4}], "stream": True}
    async with client_of(cluster) as client:
        streams = [Stream(client, hold) for _ in range(REPLICAS * (N + Q))]
        await asyncio.gather(*(s.open() for s in streams))
        assert all(s.log.status == 200 for s in streams), [s.log.status for s in streams]
        refused = await Stream(client, hold).open()
        assert refused.log.status == 429
        await refused.close()
        await streams[0].close()

        async def taken() -> bool:
            streams.append(await Stream(client, hold).open())
            return streams[-1].log.status == 200

        await until(taken, "the place of the client that went away was not freed")
        for s in streams[1:]:
            await s.close()


async def served_by(client: httpx.AsyncClient, before: dict[str, int]) -> str:
    """The replica whose count of admitted requests grew by one since `before`."""
    grown: list[str] = []

    async def one_grew() -> bool:
        rows = (await client.get("/load")).json()["replicas"]
        now = {r["replica"]: r["admitted"] for r in rows if "admitted" in r}
        grown[:] = [r for r, n in now.items() if n > before.get(r, 0)]
        return len(grown) == 1

    await until(one_grew, "no replica's admitted count grew")
    return grown[0]


async def admitted_counts(client: httpx.AsyncClient) -> dict[str, int]:
    """Each replica's count of requests admitted, once every replica has figures (a replica
    left out would look as if it had grown from none)."""
    counts: dict[str, int] = {}

    async def every_replica() -> bool:
        rows = (await client.get("/load")).json()["replicas"]
        counts.update({r["replica"]: r["admitted"] for r in rows if "admitted" in r})
        return len(rows) == REPLICAS and all("admitted" in r for r in rows)

    await until(every_replica, "a replica's figures never came")
    return counts


async def chat_turn(client: httpx.AsyncClient, message: str) -> list[tuple[str, Any]]:
    response = await client.post("/chat", json={"message": message})
    assert response.status_code == 200, response.text
    return sse_events(response.text)


async def test_a_conversations_turns_stick_to_its_replica(cluster: Cluster) -> None:
    """With both replicas idle, equal replicas take turns; a conversation's turns all the same
    go to the replica of its first turn."""
    async with client_of(cluster) as client:
        replicas = []
        for turn in range(4):
            before = await admitted_counts(client)
            events = await chat_turn(client, f"turn {turn}")
            assert reply_text(events) == f"turn {turn}"
            replicas.append(await served_by(client, before))
        assert len(set(replicas)) == 1, replicas
        # and without a conversation, the idle replicas take turns
        others = []
        for _ in range(2):
            before = await admitted_counts(client)
            body = {"messages": [{"role": "user", "content": "hi"}]}
            assert (await client.post(COMPLETIONS, json=body)).status_code == 200
            others.append(await served_by(client, before))
        assert len(set(others)) == 2, others


async def test_the_openai_sdk_and_the_pages_api_work_through_the_cluster(
    cluster: Cluster,
) -> None:
    async with client_of(cluster) as client:
        sdk = openai.AsyncOpenAI(base_url=f"{cluster.url}/v1", api_key="none")
        models = await sdk.models.list()
        assert [m.id for m in models.data] == ["mock"]
        reply = await sdk.chat.completions.create(
            model="mock", messages=[{"role": "user", "content": "one two three"}]
        )
        assert reply.choices[0].message.content == "one two three"
        parts = []
        async for chunk in await sdk.chat.completions.create(
            model="mock", messages=[{"role": "user", "content": "four five"}], stream=True
        ):
            parts.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
        assert "".join(parts) == "four five"
        completion = await sdk.completions.create(model="mock", prompt="six seven")
        assert completion.choices[0].text

        page = await client.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert (await client.get("/chat/params")).status_code == 200
        events = await chat_turn(client, "hello page")
        assert reply_text(events) == "hello page"
        history = (await client.get("/chat/history")).json()
        assert [m["content"] for m in history["messages"]] == ["hello page", "hello page"]
        figures = (await client.get("/metrics")).text
        assert figures.count("chatqueue_replica_ready{replica=") == REPLICAS


async def test_history_is_shared_through_redis(cluster: Cluster, tmp_path: Path) -> None:
    """A conversation held by the cluster is the same conversation to another server on the
    same Redis (and session secret), and goes on there."""
    async with client_of(cluster) as client:
        events = await chat_turn(client, "kept in redis")
        conversation = done_of(events)["conversation_id"]
    env = {"CHATQUEUE_SESSION_SECRET": SECRET}
    args = ("--engine", "mock", "--history", cluster.redis_url, "--mock-delay", "0")
    with running_server(*args, tmp_path=tmp_path, env=env) as other:
        async with httpx.AsyncClient(base_url=other.url, timeout=SAFETY_S) as elsewhere:
            history = await elsewhere.get("/chat/history", params={"conversation_id": conversation})
            assert [m["content"] for m in history.json()["messages"]] == ["kept in redis"] * 2
            response = await elsewhere.post(
                "/chat", json={"message": "and here", "conversation_id": conversation}
            )
            assert done_of(sse_events(response.text))["conversation_id"] == conversation
    async with client_of(cluster) as client:
        history = await client.get("/chat/history", params={"conversation_id": conversation})
        assert len(history.json()["messages"]) == 4


async def test_a_replica_killed_mid_stream_ends_its_streams_and_comes_back(
    cluster: Cluster,
) -> None:
    """SIGKILL a replica while it streams: its clients get a `replica_lost` error chunk and
    [DONE] (never a hang), the other replica's finish, new requests succeed at once, and Serve
    starts a new replica that joins when ready."""
    async with client_of(cluster) as client:
        streams = await start_on_free_slots(client, REPLICAS * N)
        for s in streams:
            await s.read_until(has_content)
        rows = (await client.get("/load")).json()["replicas"]
        victim = next(r for r in rows if r["state"] == "ready")
        os.kill(victim["pid"], signal.SIGKILL)

        logs = await asyncio.gather(*(s.read_to_end() for s in streams))
        lost = [s for s in streams if s.error is not None]
        assert len(lost) == N, [log.text[-20:] for log in logs]
        for s in lost:
            assert s.error is not None and s.error["type"] == "replica_lost"
            assert s.log.events[-1].is_done
        assert sum(1 for log in logs if log.text == LONG) == REPLICAS * N - N

        for _ in range(3):
            body = {"messages": [{"role": "user", "content": "still here"}]}
            answer = await client.post(COMPLETIONS, json=body)
            assert answer.status_code == 200, answer.text

        async def replaced() -> bool:
            rows = (await client.get("/load")).json()["replicas"]
            ids = {r["replica"] for r in rows if r["state"] == "ready"}
            return len(ids) == REPLICAS and victim["replica"] not in ids

        await until(replaced, "the killed replica was not replaced")


async def test_admission_stays_exact_when_the_routers_figures_are_stale(cluster: Cluster) -> None:
    """Half of every replica's places taken through a handle of the test's own (as a second
    front would): the front learns of them only from the replicas' next figures, so it may
    plan for slots that are taken. That replica takes what it has room for and refuses the
    rest, the next is asked, and a burst of the rest + k still gets exactly k 429s."""
    k = 2
    async with client_of(cluster) as client:
        handle = serve.get_deployment_handle("ChatQueueReplica", app_name="chatqueue")
        rows = (await client.get("/load")).json()["replicas"]
        each = (N + Q) // 2
        answers = [
            await handle.place.remote(
                Wave("test", tuple(_long_submission(f"{i}-{j}") for j in range(each)), False),
                route=RouteHint(only=row["replica"]),
            )
            for i, row in enumerate(rows)
        ]
        direct = [o for a in answers for o in a.outcomes]
        assert len(direct) == REPLICAS * each and all(isinstance(o, Admitted) for o in direct)
        channels = [
            handle.options(stream=True).events.remote("test", route=RouteHint(only=a.replica))
            for a in answers
        ]
        # as a front does while it has requests there (cluster/leases.py)
        renewing = asyncio.create_task(_renew(handle, "test", [a.replica for a in answers]))
        streams = [Stream(client, long_body()) for _ in range(REPLICAS * (N + Q) // 2 + k)]
        await asyncio.gather(*(s.open() for s in streams))
        assert sum(1 for s in streams if s.log.status == 429) == k
        logs = await asyncio.gather(*(s.read_to_end() for s in streams if s.log.status == 200))
        assert all(log.text == LONG for log in logs)
        ends = [
            event
            for c in channels
            async for data in c
            for _, events in decode(data)
            for event in events
            if isinstance(event, Finished)
        ]
        renewing.cancel()
        assert len(ends) == len(direct) and all(e.text == LONG for e in ends), ends
        asked_again = metric(
            (await client.get("/metrics")).text, "chatqueue_cluster_asked_again_total"
        )
        print(f"requests another replica took after a refusal: {asked_again:.0f}")


async def test_the_front_places_on_its_own_lines_and_a_wave_sent_twice_is_taken_once(
    cluster: Cluster,
) -> None:
    """Each replica publishes its line for fronts, and the front's waves go on it, not by Serve
    calls. A wave that comes twice (its line broke after the replica took it, and the front
    sent it again by Serve) is answered the same and admitted once."""
    async with client_of(cluster) as client:
        rows = (await client.get("/load")).json()["replicas"]
        assert all(row.get("link") for row in rows), rows
        streams = [Stream(client, body_of("on the line")) for _ in range(3)]
        await asyncio.gather(*(s.open() for s in streams))
        logs = await asyncio.gather(*(s.read_to_end() for s in streams))
        assert [log.text for log in logs] == ["on the line"] * 3
        text = (await client.get("/metrics")).text
        name = "chatqueue_cluster_wave_requests_sum"
        assert metric(text, name, by="line") >= 3 and metric(text, name, by="serve") == 0

        handle = serve.get_deployment_handle("ChatQueueReplica", app_name="chatqueue")
        twice = Wave("twice", (_long_submission("t1", "twice", "said once"),), False)
        route = RouteHint(only=rows[0]["replica"])
        first = await handle.place.remote(twice, route=route)
        again = await handle.place.remote(twice, route=route)
        assert isinstance(first.outcomes[0], Admitted) and again.outcomes == first.outcomes
        assert again.stats.admitted == first.stats.admitted
        channel = handle.options(stream=True).events.remote("twice", route=route)
        ends = [
            event
            async for data in channel
            for _, events in decode(data)
            for event in events
            if isinstance(event, Finished)
        ]
        assert [e.text for e in ends] == ["said once"]


def _long_submission(key: str, front: str = "test", text: str = LONG) -> Submission:
    return Submission(messages=(ChatMessage("user", text),), front=front, key=key)


async def _renew(handle: Any, front: str, replicas: list[str]) -> None:
    while True:
        await asyncio.sleep(RENEW_EVERY_S)
        for replica in replicas:
            await handle.renew.remote(front, route=RouteHint(only=replica))


async def test_a_front_gone_silent_has_its_requests_aborted(cluster: Cluster) -> None:
    """A front killed outright cancels nothing, and Ray does not end its calls: a request placed
    by a front that then never calls again (no channel, no renewal) is aborted by its replica
    once the front's lease runs out, long before its reply would have ended by itself, and the
    slot is free again. Seen from the channel opened afterwards: no reply comes (a request that
    had ended by itself would still have its whole reply waiting there)."""
    async with client_of(cluster) as client:
        handle = serve.get_deployment_handle("ChatQueueReplica", app_name="chatqueue")
        row = (await client.get("/load")).json()["replicas"][0]
        # 600 words: 30 s of echo at 50 ms a step, three leases
        very_long = " ".join(f"v{i}" for i in range(600))
        answer = await handle.place.remote(
            Wave("ghost", (_long_submission("g1", "ghost", very_long),), False),
            route=RouteHint(only=row["replica"]),
        )
        assert all(isinstance(o, Admitted) for o in answer.outcomes)

        async def held() -> int:
            rows = (await client.get("/load")).json()["replicas"]
            mine = next(r for r in rows if r["replica"] == row["replica"])
            return int(mine.get("running", 0) + mine.get("waiting", 0))

        async def running() -> bool:
            return await held() > 0

        async def free() -> bool:
            return await held() == 0

        await until(running, "the silent front's request running")
        await until(free, "the silent front's request aborted")
        channel = handle.options(stream=True).events.remote(
            "ghost", route=RouteHint(only=row["replica"])
        )
        arrived = [
            event for data in [d async for d in channel] for _, e in decode(data) for event in e
        ]
        assert arrived == []


async def test_the_serve_front_behind_serves_proxy_works_too(cluster: Cluster) -> None:
    """`build_app`'s application (the front as a Serve deployment, behind Serve's HTTP proxy),
    deployed beside: a streamed completion and a /chat turn go through it, here with the
    front's lines off (its waves by Serve calls)."""
    settings = Settings(
        engine="mock",
        mock_delay=0.0,
        replicas=1,
        replica_cpus=0.1,
        history="memory",
        session_secret=SECRET,
        cluster_link="off",
    )
    serve.run(app_for(settings), name="chatqueue-serve", route_prefix="/serve")
    try:
        url = f"{cluster.proxy_url}/serve"
        async with httpx.AsyncClient(base_url=url, timeout=SAFETY_S) as client:
            await until(lambda: _ready_replicas(client, 1), "the Serve front never got ready")
            body = {"messages": [{"role": "user", "content": "through the proxy"}], "stream": True}
            async with client.stream("POST", COMPLETIONS, json=body) as response:
                text = "".join([e.content async for e in sse_records(response) if e.content])
            assert text == "through the proxy"
            assert reply_text(await chat_turn(client, "a turn")) == "a turn"
            # `cluster_link="off"`: its waves went by Serve calls
            sizes = (await client.get("/metrics")).text
            name = "chatqueue_cluster_wave_requests_sum"
            assert metric(sizes, name, by="serve") >= 2 and metric(sizes, name, by="line") == 0
    finally:
        serve.delete("chatqueue-serve")


async def test_sigterm_drains_new_requests_get_503_and_streams_in_flight_finish(
    cluster: Cluster,
) -> None:
    """The last test (it stops the module's server): on SIGTERM a stream in flight goes on to
    its end, new requests meanwhile get chatqueue's 503 `shutting_down`, and the server exits 0
    once the stream is done."""
    async with client_of(cluster) as client:
        stream = await Stream(client, long_body()).open()
        await stream.read_until(has_content)
        cluster.server.process.send_signal(signal.SIGTERM)
        body = {"messages": [{"role": "user", "content": "too late"}]}
        answers: list[httpx.Response] = []

        async def refused() -> bool:
            answers.append(await client.post(COMPLETIONS, json=body))
            return answers[-1].status_code == 503

        await until(refused, "no 503 while draining")
        assert answers[-1].json()["error"]["type"] == "shutting_down"
        assert all(a.status_code in (200, 503) for a in answers), [a.status_code for a in answers]
        log = await stream.read_to_end()
        assert log.text == LONG and log.events[-1].is_done
    assert await asyncio.to_thread(cluster.server.process.wait, SAFETY_S) == 0

"""Several API servers over one core (`chatqueue serve --api-servers 2`): what only a server split
into processes can get wrong. The queue's own promises over HTTP (interleaving, the bounded
queue's exact refusals, positions, clients that leave, /load and /metrics) run against it in
test_http_queueing.py too.

A test that needs a request to reach a given API server holds one keep-alive connection to each
(found by which process holds the server end of the socket). Orderings are forced by what the
test has seen, never by sleeping; time limits are only safety nets.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from tests.support.http import (
    COMPLETIONS,
    SAFETY_S,
    OpenStream,
    assert_no_server_errors,
    chat,
    error_of,
    has_content,
    lorem,
    metric,
    metrics,
    until,
    wait_load,
)
from tests.support.servers import CHATQUEUE, Server, api_server_pids, holder_of, running_server

WORDS = 40
FLAGS = [
    "--engine", "mock", "--mock-mode", "lorem", "--mock-lorem-tokens", str(WORDS),
    "--mock-delay", "0.05", "--max-concurrent", "2", "--max-queue-size", "2",
    "--api-servers", "2", "--timeout-keep-alive", "60",
]  # fmt: skip


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(*FLAGS, tmp_path=tmp_path_factory.mktemp("api_servers")) as server:
        yield server


@asynccontextmanager
async def one_connection_each(
    server: Server,
) -> AsyncIterator[list[tuple[int, httpx.AsyncClient]]]:
    """(pid, a client) for each API server, the client holding one keep-alive connection to it."""
    pids = api_server_pids(server.process.pid)
    assert len(pids) == 2, pids
    found: dict[int, httpx.AsyncClient] = {}
    try:
        for _ in range(64):  # the kernel gives each connection to either: 2**-63 to miss one
            client = httpx.AsyncClient(
                base_url=server.url, timeout=SAFETY_S, limits=httpx.Limits(max_connections=1)
            )
            response = await client.get("/health")
            port = response.extensions["network_stream"].get_extra_info("client_addr")[1]
            pid = holder_of(port, pids)
            if pid is None or pid in found:
                await client.aclose()
                continue
            found[pid] = client
            if len(found) == len(pids):
                break
        assert len(found) == len(pids), f"connections reached only {sorted(found)} of {pids}"
        yield [(pid, found[pid]) for pid in pids]
    finally:
        for client in found.values():
            await client.aclose()


async def test_each_api_server_answers_with_the_cores_figures_and_its_own_loop(
    srv: Server,
) -> None:
    async with one_connection_each(srv) as clients:
        texts = [await metrics(c) for _, c in clients]
    lag = "chatqueue_api_server_event_loop_lag_seconds_count"
    assert [[label for label in "01" if f'{lag}{{server="{label}"}}' in t] for t in texts] in (
        [["0"], ["1"]],
        [["1"], ["0"]],
    )
    for text in texts:  # the queue's own figures, from the core
        assert "chatqueue_running_requests " in text
        assert "chatqueue_event_loop_lag_seconds_count " in text


async def test_a_conversation_goes_on_at_whichever_api_server_takes_its_next_turn(
    srv: Server,
) -> None:
    async with one_connection_each(srv) as ((_, first), (_, second)):
        turn = await first.post("/chat", json={"message": "one"})
        assert turn.status_code == 200, turn.text
        conversation = {"conversation_id": turn.headers["X-Conversation-Id"]}
        second.cookies = first.cookies  # the same browser, its next request at the other one
        turn = await second.post("/chat", json={"message": "two", **conversation})
        assert turn.status_code == 200, turn.text
        history = await first.get("/chat/history", params=conversation)
    assert history.status_code == 200, history.text
    messages = history.json()["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"] * 2
    assert [m["content"] for m in messages[::2]] == ["one", "two"]


async def test_a_killed_api_server_gives_back_its_requests_and_is_started_again(
    srv: Server,
) -> None:
    async with one_connection_each(srv) as ((victim, doomed), (_, survivor)):
        before = await metrics(survivor)
        stream = OpenStream(doomed, chat(stream=True))
        await stream.__aenter__()
        await stream.read_until(has_content)
        os.kill(victim, signal.SIGKILL)
        with pytest.raises(httpx.HTTPError):
            await stream.read_to_end()
        await wait_load(survivor, processing=0, waiting=0)  # the core aborted it
        after = await metrics(survivor)
    name = "chatqueue_finished_requests_total"
    assert metric(after, name, reason="abort") - metric(before, name, reason="abort") == 1

    async def replaced() -> bool:
        now = api_server_pids(srv.process.pid)
        return len(now) == 2 and victim not in now

    await until(replaced, "the API server was not started again")
    async with one_connection_each(srv) as clients:
        for _, client in clients:
            response = await client.post(COMPLETIONS, json=chat(stream=False))
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["message"]["content"] == lorem(WORDS)
    assert "API server 0 exited" in srv.log() or "API server 1 exited" in srv.log()


async def test_the_rate_limit_is_one_for_all_api_servers(tmp_path: Path) -> None:
    with running_server(*FLAGS, "--rate-limit", "4", tmp_path=tmp_path) as server:
        async with one_connection_each(server) as clients:
            codes = []
            for i in range(6):  # alternating: each server alone would let 4 through
                _, client = clients[i % 2]
                response = await client.post(COMPLETIONS, json=chat(stream=False))
                codes.append(response.status_code)
                if response.status_code == 429:
                    assert error_of(response)["type"] == "rate_limited"
        assert codes == [200] * 4 + [429] * 2
        assert_no_server_errors(server.log())


async def test_sigterm_drains_every_api_server_then_exits_0(tmp_path: Path) -> None:
    with running_server(*FLAGS, tmp_path=tmp_path) as server:
        pids = api_server_pids(server.process.pid)
        async with one_connection_each(server) as clients:
            streams = [OpenStream(c, chat(stream=True)) for _, c in clients]
            for stream in streams:
                await stream.__aenter__()
                await stream.read_until(has_content)
            server.process.send_signal(signal.SIGTERM)
            logs = await asyncio.gather(*(s.read_to_end() for s in streams))
        assert [log.text for log in logs] == [lorem(WORDS)] * 2
        assert all(log.events[-1].is_done for log in logs)
        assert await asyncio.to_thread(server.process.wait, SAFETY_S) == 0
        assert not alive(pids)
        assert_no_server_errors(server.log())


async def test_api_servers_end_with_their_core(tmp_path: Path) -> None:
    with running_server(*FLAGS, tmp_path=tmp_path) as server:
        pids = api_server_pids(server.process.pid)
        server.process.kill()
        server.process.wait(SAFETY_S)

        async def all_gone() -> bool:
            return not alive(pids)

        await until(all_gone, f"API servers {pids} outlived their core")


def alive(pids: list[int]) -> list[int]:
    return [pid for pid in pids if Path(f"/proc/{pid}").exists()]


def test_several_api_servers_need_a_shared_history_store() -> None:
    done = subprocess.run(
        [CHATQUEUE, "serve", "--engine", "mock", "--api-servers", "2", "--history", "memory"],
        capture_output=True,
        text=True,
        timeout=SAFETY_S * 3,
    )
    assert done.returncode == 2
    assert "--history sqlite or redis" in done.stderr

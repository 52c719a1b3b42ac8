"""SIGTERM over real HTTP: stop admitting, drain what is in flight (or abort it past the grace
period), and exit 0. Each test owns its server, since each ends it."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import httpx

from tests.support.http import (
    COMPLETIONS,
    SAFETY_S,
    OpenStream,
    assert_no_server_errors,
    chat,
    error_of,
    has_content,
    is_queued,
    lorem,
)
from tests.support.servers import Server, running_server


def mock_lorem(*, words: int, delay_s: float, max_concurrent: int, max_queue: int) -> list[str]:
    return [
        "--engine", "mock", "--mock-mode", "lorem", "--mock-lorem-tokens", str(words),
        "--mock-delay", str(delay_s),
        "--max-concurrent", str(max_concurrent), "--max-queue-size", str(max_queue),
    ]  # fmt: skip


async def sigterm_and_wait_for_drain(srv: Server, client: httpx.AsyncClient) -> None:
    """Send SIGTERM, then wait until the server says it is draining (the listener stays up)."""
    srv.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + SAFETY_S
    while (health := await client.get("/health")).status_code == 200:
        assert time.monotonic() < deadline, "the server never started draining"
        await asyncio.sleep(0.01)
    assert health.status_code == 503
    assert health.json() == {"status": "shutting_down"}


async def assert_new_requests_refused(client: httpx.AsyncClient) -> None:
    for stream in (False, True):
        response = await client.post(COMPLETIONS, json=chat(stream=stream))
        assert response.status_code == 503, response.text
        assert error_of(response)["type"] == "shutting_down"
    assert (await client.get("/load")).json()["state"] == "shutting_down"


async def exit_status(srv: Server) -> int:
    return await asyncio.to_thread(srv.process.wait, SAFETY_S)


async def test_sigterm_drains_running_and_queued_then_exits_0(tmp_path: Path) -> None:
    words = 30
    flags = mock_lorem(words=words, delay_s=0.03, max_concurrent=1, max_queue=2)
    with running_server(*flags, tmp_path=tmp_path) as srv:
        async with (
            httpx.AsyncClient(base_url=srv.url, timeout=SAFETY_S) as client,
            OpenStream(client, chat(stream=True)) as running,
            OpenStream(client, chat(stream=True)) as queued,
        ):
            await running.read_until(has_content)
            await queued.read_until(is_queued)

            await sigterm_and_wait_for_drain(srv, client)
            await assert_new_requests_refused(client)

            for log in (await running.read_to_end(), await queued.read_to_end()):
                assert log.text == lorem(words)
                assert log.chunks[-1]["choices"][0]["finish_reason"] == "stop"
                assert log.events[-1].is_done
        assert await exit_status(srv) == 0
        assert_no_server_errors(srv.log())


async def test_sigterm_past_the_grace_period_aborts_then_exits_0(tmp_path: Path) -> None:
    flags = [
        *mock_lorem(words=4000, delay_s=0.01, max_concurrent=2, max_queue=2),
        "--shutdown-timeout",
        "0.5",
    ]
    with running_server(*flags, tmp_path=tmp_path) as srv:
        async with (
            httpx.AsyncClient(base_url=srv.url, timeout=SAFETY_S) as client,
            OpenStream(client, chat(stream=True)) as first,
            OpenStream(client, chat(stream=True)) as second,
            OpenStream(client, chat(stream=True)) as queued,
        ):
            await first.read_until(has_content)
            await second.read_until(has_content)
            await queued.read_until(is_queued)

            await sigterm_and_wait_for_drain(srv, client)
            await assert_new_requests_refused(client)

            for log in [await s.read_to_end() for s in (first, second, queued)]:
                assert log.events[-1].is_done
                last = log.events[-2].data
                assert set(last) == {"error"}, last  # an error chunk, not a finish
                assert last["error"]["type"] == "shutting_down"
                assert all(c["choices"][0]["finish_reason"] is None for c in log.chunks[:-1])
        assert await exit_status(srv) == 0
        assert_no_server_errors(srv.log())

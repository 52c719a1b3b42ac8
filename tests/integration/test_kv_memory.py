"""Admission by KV memory over real HTTP, on the mock engine with a pretend block pool: a tiny
pool under many requests only makes them wait (or pause, preempted), every one completes whole;
a later turn of a conversation reports its cached prompt tokens; a request that could never fit
the pool is a 400."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.chat import chat, done_of
from tests.support.http import COMPLETIONS, SAFETY_S, assert_no_server_errors, error_of, metric
from tests.support.servers import Server, running_server

# block_size 4: the mock tokenizer's word-level chat template gives "<|user|> w1 .. wN <|end|>
# <|assistant|>" = N + 3 tokens; 16 blocks hold 64 tokens
POOL = ("--kv-cache-blocks", "16", "--kv-block-size", "4")


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    args = ("--engine", "mock", "--mock-delay", "0.005", "--history", "memory", *POOL)
    tmp = tmp_path_factory.mktemp("kv")
    with running_server(
        *args,
        "--max-concurrent",
        "6",
        "--max-queue-size",
        "64",
        "--data-dir",
        str(tmp),
        tmp_path=tmp,
    ) as server:
        yield server
    assert_no_server_errors(server.log())


def words(prefix: str, n: int) -> str:
    return " ".join(f"{prefix}{i}" for i in range(n))


async def ask(client: httpx.AsyncClient, text: str) -> tuple[int, str]:
    """A streamed request; its status and the text it streamed."""
    body = {"messages": [{"role": "user", "content": text}], "stream": True}
    async with client.stream("POST", COMPLETIONS, json=body) as res:
        if res.status_code != 200:
            await res.aread()
            return res.status_code, res.text
        parts = []
        async for line in res.aiter_lines():
            if line.startswith("data: {"):
                chunk = httpx.Response(200, content=line[6:]).json()
                assert "error" not in chunk, chunk
                if chunk["choices"]:
                    parts.append(chunk["choices"][0]["delta"].get("content") or "")
        return 200, "".join(parts)


async def test_a_tiny_pool_under_many_requests_only_waits_and_every_reply_is_whole(
    srv: Server,
) -> None:
    texts = [words(f"r{n}w", 6 + n % 8) for n in range(40)]  # 9-16 prompt tokens, as many more
    async with httpx.AsyncClient(base_url=srv.url, timeout=SAFETY_S * 6) as client:
        before = metric((await client.get("/metrics")).text, "chatqueue_preemptions_total")
        results = await asyncio.gather(*(ask(client, t) for t in texts))
        after = (await client.get("/metrics")).text
        load = (await client.get("/load")).json()
    assert [status for status, _ in results] == [200] * len(texts)
    assert [text for _, text in results] == texts  # echoed once: nothing twice, nothing lost
    assert metric(after, "chatqueue_preemptions_total") > before  # decode did run out of blocks
    assert load["kv_blocks_total"] == 16 and load["kv_block_size"] == 4
    assert load["kv_blocks_used"] == 0 and load["kv_blocks_free"] == 16
    assert metric(after, "chatqueue_kv_blocks_free") == 16


def test_turn_two_of_a_chat_reports_cached_prompt_tokens(srv: Server) -> None:
    with httpx.Client(base_url=srv.url, timeout=SAFETY_S) as c:
        first = done_of(chat(c, words("a", 9)))
        second = done_of(chat(c, words("b", 3)))
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    # turn 1: 12 prompt tokens, 9 echoed (the last never fed): 20 tokens of KV, 5 full blocks
    assert second["usage"]["prompt_tokens"] == 12 + 10 + 6
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == 20


def test_the_openai_api_reports_cached_tokens_on_the_next_turn(srv: Server) -> None:
    user = {"role": "user", "content": words("c", 9)}
    with httpx.Client(base_url=srv.url, timeout=SAFETY_S) as c:
        first = c.post(COMPLETIONS, json={"messages": [user]}).json()
        reply = first["choices"][0]["message"]
        turn2 = [user, reply, {"role": "user", "content": "more"}]
        second = c.post(
            COMPLETIONS,
            json={"messages": turn2, "stream": True, "stream_options": {"include_usage": True}},
        )
    usage = [line for line in second.text.splitlines() if '"usage"' in line][-1]
    assert '"prompt_tokens_details":{"cached_tokens":20}' in usage.replace(" ", "")
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}


def test_a_request_that_could_never_fit_the_pool_is_refused(srv: Server) -> None:
    user = {"role": "user", "content": words("d", 10)}  # 13 tokens
    with httpx.Client(base_url=srv.url, timeout=SAFETY_S) as c:
        too_long = c.post(COMPLETIONS, json={"messages": [user], "max_tokens": 60})
        fits = c.post(COMPLETIONS, json={"messages": [user], "max_tokens": 50})
        huge = c.post(COMPLETIONS, json={"messages": [{"role": "user", "content": words("e", 70)}]})
    assert too_long.status_code == 400
    error = error_of(too_long)
    assert error["param"] == "max_tokens" and "64" in error["message"]
    assert fits.status_code == 200
    assert huge.status_code == 400 and error_of(huge)["param"] == "messages"


def test_without_a_pool_load_reports_none(tmp_path: Path) -> None:
    with running_server("--engine", "mock", tmp_path=tmp_path) as server:
        load = server.load()
    assert load["kv_blocks_total"] is None and load["prefix_hit_rate"] is None

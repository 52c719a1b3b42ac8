"""The real default model (SmolLM2-135M-Instruct) behind the real server, over real HTTP.

One server with continuous batching (the model in its own process) for the module, and one with
`--batching off --model-process off` for the comparison (it also shows /health from the moment its process starts). Replies are kept short:
the point is what the server does with the model's tokens, not what the model knows. Readiness is
also checked in-process, with a runner whose loading waits on an event.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from chatqueue import ChatQueue
from chatqueue.config import Settings
from chatqueue.engine.mock import MockRunner
from chatqueue.engine.runner import Runner
from chatqueue.server.app import create_app
from tests.support.http import COMPLETIONS, SAFETY_S, assert_no_server_errors
from tests.support.servers import Server, model_process, running_server

TIMEOUT_S = 60.0  # a safety net for the slow CPU, never a measurement
CONTEXT_WINDOW = 8192  # SmolLM2's max_position_embeddings
PROMPTS = ["What is 2+2?", "Name three colors.", "Write a haiku about the sea.", "Hi!"]


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # NOTE: the transformers engine, named: on a CPU `--engine auto` would pick llama.cpp, whose
    # server path test_llamacpp_server.py covers.
    with running_server(
        "--engine", "hf", "--max-concurrent", "8", tmp_path=tmp_path_factory.mktemp("model")
    ) as server:
        yield server
    assert_no_server_errors(server.log())


@pytest.fixture(scope="module")
def oai(srv: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=f"{srv.url}/v1", api_key="x", max_retries=0, timeout=TIMEOUT_S
    ) as c:
        yield c


@pytest.fixture
async def client(srv: Server) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=srv.url, timeout=TIMEOUT_S) as c:
        yield c


def say(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


async def complete(client: httpx.AsyncClient, prompt: str, **fields: Any) -> dict[str, Any]:
    response = await client.post(COMPLETIONS, json={"messages": say(prompt), **fields})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def text_of(body: dict[str, Any]) -> str:
    return str(body["choices"][0]["message"]["content"])


def finish_of(body: dict[str, Any]) -> str:
    return str(body["choices"][0]["finish_reason"])


# -- answers -------------------------------------------------------------------------------
@pytest.mark.model
def test_the_openai_client_gets_tokyo(oai: openai.OpenAI) -> None:
    reply = oai.chat.completions.create(
        model=oai.models.list().data[0].id,
        messages=[{"role": "user", "content": "What is the capital of Japan?"}],
        temperature=0,
        max_tokens=24,
    )
    assert "Tokyo" in (reply.choices[0].message.content or "")


@pytest.mark.model
def test_turn_two_of_a_conversation_reports_cached_prompt_tokens(oai: openai.OpenAI) -> None:
    """The second turn re-sends the first; its KV is found in the prefix cache (whole blocks of
    16 tokens), so only the rest is prefilled, and usage says how much was reused."""
    model = oai.models.list().data[0].id
    messages: list[Any] = [
        {"role": "system", "content": f"You answer in one short sentence. Session {time.time()}."},
        {"role": "user", "content": "Name a fruit."},
    ]
    first = oai.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=12
    )
    messages += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And a vegetable?"},
    ]
    second = oai.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=4
    )
    assert first.usage is not None and second.usage is not None
    assert first.usage.prompt_tokens_details is not None
    assert second.usage.prompt_tokens_details is not None
    assert first.usage.prompt_tokens_details.cached_tokens == 0  # a system prompt never seen
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached is not None
    assert first.usage.prompt_tokens // 16 * 16 <= cached < second.usage.prompt_tokens
    assert cached % 16 == 0


async def test_same_seed_same_text_alone_and_beside_other_requests(
    client: httpx.AsyncClient,
) -> None:
    seeded = {"temperature": 0.8, "seed": 1234, "max_tokens": 16}
    prompt = "Tell me a short story about a cat."
    first = text_of(await complete(client, prompt, **seeded))
    second = text_of(await complete(client, prompt, **seeded))

    others = [complete(client, p, temperature=1.0, max_tokens=12) for p in PROMPTS]
    crowded, *_ = await asyncio.gather(complete(client, prompt, **seeded), *others)

    assert first == second == text_of(crowded)
    assert first


@pytest.mark.model
async def test_a_stop_string_ends_the_reply_and_is_not_sent(client: httpx.AsyncClient) -> None:
    prompt = "Write a long story about the sea."
    greedy = text_of(await complete(client, prompt, temperature=0, max_tokens=32))
    words = greedy.split()
    stop = next(w for w in words[len(words) // 2 :] if greedy.index(w) > 0)

    plain = await complete(client, prompt, temperature=0, max_tokens=32, stop=[stop])
    streamed = await client.post(
        COMPLETIONS,
        json={
            "messages": say(prompt),
            "temperature": 0,
            "max_tokens": 32,
            "stop": stop,
            "stream": True,
        },
    )

    expected = greedy[: greedy.index(stop)]
    assert (text_of(plain), finish_of(plain)) == (expected, "stop")
    chunks = sse_contents(streamed.text)
    assert "".join(chunks) == expected
    assert all(stop not in chunk for chunk in chunks)


@pytest.mark.model
async def test_max_tokens_gives_length_with_exactly_that_many_tokens(
    client: httpx.AsyncClient,
) -> None:
    body = await complete(client, "Write a long story about the sea.", temperature=0, max_tokens=7)
    assert finish_of(body) == "length"
    assert body["usage"]["completion_tokens"] == 7


@pytest.mark.model
async def test_eos_gives_stop(client: httpx.AsyncClient) -> None:
    body = await complete(client, "Say hi.", temperature=0, max_tokens=48)
    assert finish_of(body) == "stop"
    assert 0 < body["usage"]["completion_tokens"] < 48


@pytest.mark.model
async def test_a_japanese_reply_streams_in_whole_characters(client: httpx.AsyncClient) -> None:
    prompt = "日本の首都はどこですか？日本語で答えてください。"
    plain = text_of(await complete(client, prompt, temperature=0, max_tokens=24))
    streamed = await client.post(
        COMPLETIONS,
        json={"messages": say(prompt), "temperature": 0, "max_tokens": 24, "stream": True},
    )

    chunks = sse_contents(streamed.text)
    assert "".join(chunks) == plain
    assert any(ord(c) > 0x3000 for c in plain)  # it did answer with multi-byte characters
    assert all("\ufffd" not in chunk for chunk in chunks)


@pytest.mark.model
async def test_a_request_past_the_context_window_is_a_400_naming_both_numbers(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post(COMPLETIONS, json={"messages": say("Hi"), "max_tokens": 1_000_000})
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert str(CONTEXT_WINDOW) in message
    assert "1000000" in message


# -- batching off: the same model one request at a time ----------------------------------------
@pytest.mark.model
async def test_batching_off_gives_the_same_greedy_text(
    client: httpx.AsyncClient, tmp_path_factory: pytest.TempPathFactory
) -> None:
    greedy = {"temperature": 0, "max_tokens": 20}
    batched = await asyncio.gather(*(complete(client, p, **greedy) for p in PROMPTS))

    health: list[httpx.Response] = []
    # NOTE: the module's server runs the model in its own process (the default); this one in the
    # server's process, so both paths give the same text.
    with running_server(
        "--engine",
        "hf",
        "--batching",
        "off",
        "--model-process",
        "off",
        tmp_path=tmp_path_factory.mktemp("off"),
        health_log=health,
    ) as off:
        async with httpx.AsyncClient(base_url=off.url, timeout=TIMEOUT_S) as off_client:
            one_by_one = await asyncio.gather(*(complete(off_client, p, **greedy) for p in PROMPTS))
        assert_no_server_errors(off.log())

    assert [text_of(b) for b in one_by_one] == [text_of(b) for b in batched]
    # From the moment the process started: loading, then ready, and nothing else.
    answers = [(r.status_code, r.json()) for r in health]
    assert answers[-1] == (200, {"status": "ok"})
    assert all(a in [(503, {"status": "loading"}), (200, {"status": "ok"})] for a in answers)


def sse_contents(raw: str) -> list[str]:
    """The content of every chat.completion.chunk in a whole SSE body, in order."""
    contents = []
    for line in raw.splitlines():
        if line.startswith("data: {"):
            chunk = json.loads(line[len("data: ") :])
            assert "error" not in chunk, chunk
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                contents.append(chunk["choices"][0]["delta"]["content"])
    return contents


# -- readiness, in-process: a model that is still loading ---------------------------------------
async def test_health_and_requests_are_503_loading_until_the_model_is_ready() -> None:
    loaded = threading.Event()

    def load() -> Runner:
        loaded.wait(SAFETY_S)
        return MockRunner()

    cq = ChatQueue(load, max_concurrent=1, max_queue_size=1)
    app = create_app(Settings(engine="mock"), chat_queue=cq)
    await cq.start_queue_worker()
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://test"
        ) as http:
            health = await http.get("/health")
            chat = await asyncio.wait_for(
                http.post(COMPLETIONS, json={"messages": say("hello")}), SAFETY_S
            )
            assert (health.status_code, health.json()) == (503, {"status": "loading"})
            assert chat.status_code == 503
            assert chat.json()["error"]["type"] == "loading"

            loaded.set()
            await cq.wait_ready(SAFETY_S)
            health = await http.get("/health")
            chat = await http.post(COMPLETIONS, json={"messages": say("hello")})
            assert (health.status_code, health.json()) == (200, {"status": "ok"})
            assert chat.status_code == 200
    finally:
        loaded.set()
        await cq.stop(SAFETY_S)


@pytest.mark.model
async def test_the_real_model_process_comes_back_after_a_kill(tmp_path: Path) -> None:
    question = "What is the capital of Japan? Answer in one word."
    with running_server("--engine", "hf", "--max-concurrent", "2", tmp_path=tmp_path) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT_S) as client:
            before = text_of(await complete(client, question, temperature=0, max_tokens=8))
            os.kill(model_process(server.process.pid), signal.SIGKILL)
            deadline = time.monotonic() + TIMEOUT_S
            while (health := await client.get("/health")).status_code != 200 or (
                "last_model_exit" not in health.json()
            ):
                assert time.monotonic() < deadline, "the model process did not come back"
                await asyncio.sleep(0.05)
            after = text_of(await complete(client, question, temperature=0, max_tokens=8))
    assert "Tokyo" in before and after == before
    assert health.json()["last_model_exit"] == "exited (killed by SIGKILL)"

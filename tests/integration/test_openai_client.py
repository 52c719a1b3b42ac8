"""OpenAI compatibility over real HTTP: the wire format, then the official `openai` client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
import openai
import pytest

from tests.support.http import (
    COMPLETIONS,
    SAFETY_S,
    OpenStream,
    assert_no_server_errors,
    chat,
    error_of,
    has_content,
    read_stream,
)
from tests.support.servers import Server, running_server

MESSAGE = "the quick brown fox jumps over the lazy dog"
LONG = " ".join(["word"] * 400)  # echoed back: holds the one slot until the test lets go


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # One slot and no queue: a second request while one runs is a 429 at once.
    flags = (
        "--engine", "mock", "--mock-mode", "echo", "--mock-delay", "0.005",
        "--max-concurrent", "1", "--max-queue-size", "0",
    )  # fmt: skip
    with running_server(*flags, tmp_path=tmp_path_factory.mktemp("openai")) as server:
        yield server


@pytest.fixture
async def client(srv: Server) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=srv.url, timeout=SAFETY_S) as c:
        yield c
    srv.wait_idle()
    assert_no_server_errors(srv.log())


@pytest.fixture
def oai(srv: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0, timeout=SAFETY_S) as c:
        yield c
    srv.wait_idle()
    assert_no_server_errors(srv.log())


def say(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


# -- the wire format -----------------------------------------------------------------------
async def test_plain_completion_has_the_message_and_usage(client: httpx.AsyncClient) -> None:
    response = await client.post(COMPLETIONS, json={"messages": say(MESSAGE)})
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-") and body["model"] == "mock"
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "stop"
    assert choice["message"] == {"role": "assistant", "content": MESSAGE}
    usage = body["usage"]
    assert usage["completion_tokens"] == len(MESSAGE.split())
    assert usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_max_tokens_ends_with_length(client: httpx.AsyncClient) -> None:
    response = await client.post(COMPLETIONS, json={"messages": say(MESSAGE), "max_tokens": 3})
    [choice] = response.json()["choices"]
    assert choice["finish_reason"] == "length"
    assert choice["message"]["content"] == "the quick brown"
    assert response.json()["usage"]["completion_tokens"] == 3


async def test_streamed_chunks_end_with_done(client: httpx.AsyncClient) -> None:
    log = await read_stream(client, {"messages": say(MESSAGE), "stream": True})
    assert log.status == 200
    assert log.events[-1].is_done
    assert sum(e.is_done for e in log.events) == 1
    chunks = log.chunks
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert all("usage" not in c for c in chunks)
    assert log.text == MESSAGE


async def test_include_usage_adds_a_last_chunk_with_usage(client: httpx.AsyncClient) -> None:
    body = {"messages": say(MESSAGE), "stream": True, "stream_options": {"include_usage": True}}
    log = await read_stream(client, body)
    *_, finish, usage_chunk = log.chunks
    assert finish["choices"][0]["finish_reason"] == "stop"
    assert usage_chunk["object"] == "chat.completion.chunk"
    assert usage_chunk["choices"] == []
    usage = usage_chunk["usage"]
    assert usage["completion_tokens"] == len(MESSAGE.split())
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert log.events[-1].is_done
    assert log.text == MESSAGE


async def test_full_server_is_a_429_with_retry_after(client: httpx.AsyncClient) -> None:
    async with OpenStream(client, chat(stream=True, messages=say(LONG))) as holder:
        await holder.read_until(has_content)
        response = await client.post(COMPLETIONS, json=chat(stream=True))
    assert response.status_code == 429
    assert int(response.headers["Retry-After"]) >= 1
    assert error_of(response)["type"] == "queue_full"


# -- the official client -------------------------------------------------------------------
def test_openai_plain_completion(oai: openai.OpenAI) -> None:
    completion = oai.chat.completions.create(model="mock", messages=say(MESSAGE))  # type: ignore[arg-type]
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == MESSAGE
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == len(MESSAGE.split())


def test_openai_streamed_completion(oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model="mock",
        messages=say(MESSAGE),  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish_reasons, usage = "", [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish_reasons.append(choice.finish_reason)
    assert text == MESSAGE
    assert finish_reasons[-1] == "stop"
    assert usage is not None and usage.completion_tokens == len(MESSAGE.split())


def test_openai_lists_the_model(oai: openai.OpenAI) -> None:
    assert [m.id for m in oai.models.list()] == ["mock"]


def test_openai_wrong_model_is_a_bad_request(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model="gpt-4o", messages=say(MESSAGE))  # type: ignore[arg-type]
    assert info.value.status_code == 400
    assert info.value.param == "model"


async def test_openai_rate_limit_error_when_full(client: httpx.AsyncClient, srv: Server) -> None:
    async with OpenStream(client, chat(stream=True, messages=say(LONG))) as holder:
        await holder.read_until(has_content)
        async with openai.AsyncOpenAI(
            base_url=f"{srv.url}/v1", api_key="x", max_retries=0, timeout=SAFETY_S
        ) as oai:
            with pytest.raises(openai.RateLimitError) as info:
                await oai.chat.completions.create(model="mock", messages=say(MESSAGE))  # type: ignore[arg-type]
            with pytest.raises(openai.RateLimitError):
                await oai.chat.completions.create(
                    model="mock",
                    messages=say(MESSAGE),  # type: ignore[arg-type]
                    stream=True,
                )
    error = info.value
    assert error.status_code == 429
    assert error.type == "queue_full"
    assert int(error.response.headers["retry-after"]) >= 1

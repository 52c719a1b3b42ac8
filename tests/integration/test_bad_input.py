"""Bad input over real HTTP: always 400 in OpenAI's error shape, never 500, never queued."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from tests.support.http import (
    COMPLETIONS,
    HELLO,
    SAFETY_S,
    assert_no_server_errors,
    error_of,
    load,
    metric,
    metrics,
)
from tests.support.servers import Server, running_server

# Counters that move for anything that reached the queue, admitted or refused.
QUEUE_FIGURES = (
    "chatqueue_queue_wait_seconds_count",
    "chatqueue_prompt_tokens_total",
    "chatqueue_engine_steps_total",
)


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    flags = (
        "--engine",
        "mock",
        "--mock-delay",
        "0",
        "--max-concurrent",
        "2",
        "--max-queue-size",
        "2",
    )
    with running_server(*flags, tmp_path=tmp_path_factory.mktemp("bad_input")) as server:
        yield server


@pytest.fixture
async def client(srv: Server) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=srv.url, timeout=SAFETY_S) as c:
        yield c
    assert_no_server_errors(srv.log())


def queue_figures(text: str) -> dict[str, float]:
    figures = {name: metric(text, name) for name in QUEUE_FIGURES}
    for reason in ("stop", "length", "abort", "error"):
        figures[reason] = metric(text, "chatqueue_finished_requests_total", reason=reason)
    for reason in ("queue_full", "user_queue_full"):
        figures[reason] = metric(text, "chatqueue_rejected_requests_total", reason=reason)
    return figures


def with_message(**message: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "hi", **message}]}


def with_field(**fields: Any) -> dict[str, Any]:
    return {"messages": HELLO, **fields}


JSON_BODIES: dict[str, Any] = {
    "body is a list": [HELLO],
    "body is a string": "hello",
    "body is a number": 42,
    "body is null": None,
    "messages missing": {},
    "messages empty": {"messages": []},
    "messages a string": {"messages": "hello"},
    "messages an object": {"messages": {"role": "user", "content": "hi"}},
    "message not an object": {"messages": ["hello"]},
    "unknown role": with_message(role="robot"),
    "role missing": {"messages": [{"content": "hi"}]},
    "content missing": {"messages": [{"role": "user"}]},
    "content a number": with_message(content=42),
    "content an object": with_message(content={"text": "hi"}),
    "content part of unknown type": with_message(content=[{"type": "image", "text": "hi"}]),
    "max_tokens 0": with_field(max_tokens=0),
    "max_tokens negative": with_field(max_tokens=-5),
    "max_tokens a word": with_field(max_tokens="ten"),
    "max_tokens a numeric string": with_field(max_tokens="5"),
    "max_tokens fractional": with_field(max_tokens=2.5),
    "max_completion_tokens 0": with_field(max_completion_tokens=0),
    "temperature -1": with_field(temperature=-1),
    "temperature 3": with_field(temperature=3),
    "temperature a word": with_field(temperature="hot"),
    "temperature a numeric string": with_field(temperature="0.5"),
    "seed a numeric string": with_field(seed="7"),
    "top_p 0": with_field(top_p=0),
    "top_p 1.5": with_field(top_p=1.5),
    "n 129": with_field(n=129),
    "n a float": with_field(n=2.0),
    "n 0": with_field(n=0),
    "wrong model": with_field(model="gpt-4o"),
    "too many stop strings": with_field(stop=["a", "b", "c", "d", "e"]),
    "stop a number": with_field(stop=7),
    "stream not a bool": with_field(stream="sometimes"),
    "stream_options not an object": with_field(stream=True, stream_options="usage"),
    "prompt past the context window": with_field(max_tokens=1_000_000),
    # strict types, as OpenAI's: no coercion between strings, numbers and booleans, and no float
    # for an integer field, even a whole one
    "stream a string true": with_field(stream="true"),
    "stream 1": with_field(stream=1),
    "ignore_eos a string": with_field(ignore_eos="yes"),
    "ignore_eos 1": with_field(ignore_eos=1),
    "include_usage a string": with_field(stream=True, stream_options={"include_usage": "true"}),
    "max_tokens a whole float": with_field(max_tokens=5.0),
    "max_tokens true": with_field(max_tokens=True),
    "seed a whole float": with_field(seed=7.0),
    "top_k a whole float": with_field(top_k=5.0),
    "top_p a numeric string": with_field(top_p="0.5"),
    "n true": with_field(n=True),
    "n a whole float": with_field(n=1.0),
    "user a number": with_field(user=5),
    "model a number": with_field(model=5),
    "stop 5": with_field(stop=5),
    "stop a list of numbers": with_field(stop=[5]),
    "queue_timeout a string": with_field(queue_timeout="5"),
    "content 5": with_message(content=5),
    "content true": with_message(content=True),
    "content part text a number": with_message(content=[{"type": "text", "text": 5}]),
    "name a number": with_message(name=5),
}

# Each strict case above names its field in `param`, OpenAI's way: the JSON path, without the
# validator's own words (no "str" or "list[TextPart]" of a union tried in turn).
NAMED_FIELDS: dict[str, str] = {
    "stream a string true": "stream",
    "stream 1": "stream",
    "ignore_eos a string": "ignore_eos",
    "temperature a numeric string": "temperature",
    "max_tokens a whole float": "max_tokens",
    "n true": "n",
    "user a number": "user",
    "stop 5": "stop",
    "content 5": "messages.0.content",
    "content part text a number": "messages.0.content.0.text",
}

RAW_BODIES: dict[str, bytes] = {
    "malformed JSON": b'{"messages": [{"role": "user", "content": "hi"}',
    "trailing garbage": b'{"messages": []} xyz',
    "not UTF-8": b'{"messages": "\xff\xfe"}',
    "empty body": b"",
}


async def assert_refused_at_the_edge(client: httpx.AsyncClient, send: Any) -> dict[str, Any]:
    before = queue_figures(await metrics(client))
    response: httpx.Response = await send()
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["type"] == "invalid_request_error"
    assert queue_figures(await metrics(client)) == before, "a bad request reached the queue"
    now = await load(client)
    assert (now["processing"], now["waiting"]) == (0, 0)
    return error


@pytest.mark.parametrize("body", JSON_BODIES.values(), ids=JSON_BODIES.keys())
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
async def test_bad_json_body_is_a_400(client: httpx.AsyncClient, body: Any, stream: bool) -> None:
    if stream and isinstance(body, dict) and "stream" not in body:
        body = {**body, "stream": True}
    await assert_refused_at_the_edge(client, lambda: client.post(COMPLETIONS, json=body))


@pytest.mark.parametrize("raw", RAW_BODIES.values(), ids=RAW_BODIES.keys())
async def test_unparsable_body_is_a_400(client: httpx.AsyncClient, raw: bytes) -> None:
    headers = {"Content-Type": "application/json"}
    await assert_refused_at_the_edge(
        client, lambda: client.post(COMPLETIONS, content=raw, headers=headers)
    )


async def test_the_error_names_the_bad_field(client: httpx.AsyncClient) -> None:
    error = await assert_refused_at_the_edge(
        client, lambda: client.post(COMPLETIONS, json=with_field(temperature=3))
    )
    assert error["param"] == "temperature"
    error = await assert_refused_at_the_edge(
        client, lambda: client.post(COMPLETIONS, json=with_field(model="gpt-4o"))
    )
    assert error["param"] == "model"


@pytest.mark.parametrize("case", NAMED_FIELDS, ids=NAMED_FIELDS.keys())
async def test_a_mistyped_field_is_named(client: httpx.AsyncClient, case: str) -> None:
    error = await assert_refused_at_the_edge(
        client, lambda: client.post(COMPLETIONS, json=JSON_BODIES[case])
    )
    assert error["param"] == NAMED_FIELDS[case]
    assert NAMED_FIELDS[case] in error["message"]


async def test_whole_numbers_still_go_in_float_fields(client: httpx.AsyncClient) -> None:
    response = await client.post(
        COMPLETIONS, json=with_field(max_tokens=5, temperature=1, top_p=1, queue_timeout=5)
    )
    assert response.status_code == 200, response.text


async def test_a_good_request_still_works_after_the_bad_ones(client: httpx.AsyncClient) -> None:
    response = await client.post(COMPLETIONS, json=with_field(max_tokens=5))
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "hello"

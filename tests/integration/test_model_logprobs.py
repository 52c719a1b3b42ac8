"""Logprobs, /v1/completions, n and seed on the real default model (SmolLM2-135M-Instruct, CPU),
behind the real server (continuous batching, the model in its own process), over real HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.support.http import assert_no_server_errors
from tests.support.servers import Server, running_server

TIMEOUT_S = 60.0  # a safety net for the slow CPU, never a measurement
MODEL = "SmolLM2-135M-Instruct-Q4_1"  # the name the default model serves under
QUESTION = [{"role": "user", "content": "Name three colors."}]


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(
        "--engine", "hf", "--max-concurrent", "8", tmp_path=tmp_path_factory.mktemp("logprobs")
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
        srv.wait_idle()
        load = (await c.get("/load")).json()
    assert (load["processing"], load["waiting"]) == (0, 0)


def check_sorted_and_top1_is_the_token(content: list[Any]) -> None:
    for t in content:
        values = [a.logprob for a in t.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert all(v <= 0 for v in values) and t.logprob <= 0
        # greedy: the token reported is the most likely one, with the same logprob
        assert t.top_logprobs[0].token == t.token
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob)


def test_greedy_chat_logprobs_report_the_greedy_token_as_top_1(oai: openai.OpenAI) -> None:
    plain = oai.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        temperature=0,
        max_tokens=12,  # type: ignore[arg-type]
    )
    done = oai.chat.completions.create(
        model=MODEL,
        messages=QUESTION,  # type: ignore[arg-type]
        temperature=0,
        max_tokens=12,
        logprobs=True,
        top_logprobs=5,
    )
    assert done.choices[0].message.content == plain.choices[0].message.content
    content = done.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == done.usage.completion_tokens  # type: ignore[union-attr]
    assert all(len(t.top_logprobs) == 5 for t in content)
    check_sorted_and_top1_is_the_token(content)
    assert "".join(t.token for t in content) == done.choices[0].message.content


def test_streamed_chat_logprobs_are_those_of_the_plain_reply(oai: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {
        "model": MODEL,
        "messages": QUESTION,
        "temperature": 0,
        "max_tokens": 12,
        "logprobs": True,
        "top_logprobs": 2,
    }
    plain = oai.chat.completions.create(**kwargs)
    chunks = list(oai.chat.completions.create(stream=True, **kwargs))
    streamed = [
        t for c in chunks if c.choices and c.choices[0].logprobs
        for t in c.choices[0].logprobs.content or []
    ]  # fmt: skip
    expected = plain.choices[0].logprobs.content  # type: ignore[union-attr]
    assert [t.token for t in streamed] == [t.token for t in expected or []]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in expected or []])
    check_sorted_and_top1_is_the_token(streamed)


def test_sampled_logprobs_are_below_zero_and_the_token_is_among_the_candidates(
    oai: openai.OpenAI,
) -> None:
    done = oai.chat.completions.create(
        model=MODEL,
        messages=QUESTION,  # type: ignore[arg-type]
        temperature=0.8,
        seed=1,
        max_tokens=12,
        logprobs=True,
        top_logprobs=20,
    )
    for t in done.choices[0].logprobs.content or []:  # type: ignore[union-attr]
        values = [a.logprob for a in t.top_logprobs]
        assert values == sorted(values, reverse=True) and t.logprob <= 0
        assert t.logprob <= values[0] + 1e-6


def test_completions_from_text_and_from_token_ids(oai: openai.OpenAI) -> None:
    done = oai.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=4,
        temperature=0, logprobs=3,
    )  # fmt: skip
    choice = done.choices[0]
    assert choice.text and choice.logprobs is not None and choice.logprobs.tokens is not None
    assert "".join(choice.logprobs.tokens) == choice.text
    assert choice.logprobs.text_offset is not None and choice.logprobs.text_offset[0] == 0
    for token, top in zip(choice.logprobs.tokens, choice.logprobs.top_logprobs or [], strict=True):
        assert max(top, key=top.__getitem__) == token  # greedy: the token is the top one
    by_ids = oai.completions.create(model=MODEL, prompt=[504, 3575, 282, 4649, 314], max_tokens=3)
    assert by_ids.usage is not None and by_ids.usage.prompt_tokens == 5
    echoed = oai.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=3, echo=True)
    assert echoed.choices[0].text.startswith("Once upon a time")


def test_a_token_id_outside_the_vocabulary_is_a_400(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        oai.completions.create(model=MODEL, prompt=[1, 49152], max_tokens=2)
    assert caught.value.body["param"] == "prompt"  # type: ignore[index]


async def test_seeded_choices_give_the_same_text_beside_other_requests(
    client: httpx.AsyncClient,
) -> None:
    body = {
        "prompt": "My favourite animal is",
        "seed": 1234,
        "n": 2,
        "temperature": 1.0,
        "max_tokens": 10,
    }
    alone = (await client.post("/v1/completions", json=body)).json()["choices"]
    others = [
        client.post("/v1/completions", json={"prompt": p, "max_tokens": 10, "temperature": 1.0})
        for p in ("A long time ago,", "The weather today", "def main():")
    ]
    crowded, *_ = await asyncio.gather(client.post("/v1/completions", json=body), *others)
    assert [c["text"] for c in crowded.json()["choices"]] == [c["text"] for c in alone]
    again = (await client.post("/v1/completions", json={**body, "n": 1})).json()["choices"]
    assert again[0]["text"] == alone[0]["text"]  # choice 0 uses the seed itself

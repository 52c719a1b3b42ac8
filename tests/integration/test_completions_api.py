"""/v1/completions, logprobs, n and seed, /v1/models/{id}: real HTTP to a mock-engine server, with
the official `openai` client where it can speak, raw httpx where the wire format is the point."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
import openai
import pytest

from tests.support.http import SAFETY_S, assert_no_server_errors
from tests.support.servers import Server, running_server

PROMPT = "the quick brown fox jumps"


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # Two slots and two queue places: a request of n=5 can never fit.
    flags = (
        "--engine", "mock", "--mock-mode", "echo", "--mock-delay", "0.002",
        "--max-concurrent", "2", "--max-queue-size", "2",
    )  # fmt: skip
    with running_server(*flags, tmp_path=tmp_path_factory.mktemp("completions")) as server:
        yield server


@pytest.fixture
def oai(srv: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0, timeout=SAFETY_S) as c:
        yield c
    srv.wait_idle()
    assert_no_server_errors(srv.log())


@pytest.fixture
async def client(srv: Server) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=srv.url, timeout=SAFETY_S) as c:
        yield c
    srv.wait_idle()
    assert_no_server_errors(srv.log())


def assert_nothing_held(srv: Server) -> None:
    srv.wait_idle()
    load = httpx.get(f"{srv.url}/load", timeout=SAFETY_S).json()
    assert (load["processing"], load["waiting"]) == (0, 0)


# -- /v1/completions -----------------------------------------------------------------------
def test_a_text_prompt_completes(oai: openai.OpenAI) -> None:
    done = oai.completions.create(model="mock", prompt=PROMPT, max_tokens=16)
    assert done.object == "text_completion"
    assert done.choices[0].text == PROMPT  # the mock echoes a plain prompt
    assert done.choices[0].finish_reason == "stop"
    assert done.usage is not None and done.usage.completion_tokens == 5


def test_max_tokens_stops_with_length(oai: openai.OpenAI) -> None:
    done = oai.completions.create(model="mock", prompt=PROMPT, max_tokens=2)
    assert done.choices[0].text == "the quick"
    assert done.choices[0].finish_reason == "length"


def test_token_id_prompts_and_lists_of_prompts_give_one_choice_each(
    oai: openai.OpenAI, client: httpx.AsyncClient
) -> None:
    first = oai.completions.create(model="mock", prompt=PROMPT, max_tokens=1, logprobs=0)
    assert first.choices[0].logprobs is not None
    word = first.choices[0].logprobs.tokens[0]
    assert word == "the"
    ids_done = oai.completions.create(model="mock", prompt="jumps over", max_tokens=8)
    assert ids_done.choices[0].text == "jumps over"
    both = oai.completions.create(model="mock", prompt=["fox jumps", "lazy dog"], max_tokens=8)
    assert [c.index for c in both.choices] == [0, 1]
    assert [c.text for c in both.choices] == ["fox jumps", "lazy dog"]


async def test_token_ids_in_and_a_list_of_them(client: httpx.AsyncClient) -> None:
    # the mock's lorem words have fixed ids from 4 on: "Lorem ipsum dolor"
    response = await client.post("/v1/completions", json={"prompt": [4, 5, 6], "max_tokens": 8})
    assert response.status_code == 200
    assert response.json()["choices"][0]["text"] == "Lorem ipsum dolor"
    response = await client.post("/v1/completions", json={"prompt": [[4], [5, 6]]})
    assert [c["text"] for c in response.json()["choices"]] == ["Lorem", " ipsum dolor"]


def test_echo_puts_the_prompt_first(oai: openai.OpenAI) -> None:
    done = oai.completions.create(model="mock", prompt=PROMPT, max_tokens=2, echo=True)
    assert done.choices[0].text == PROMPT + "the quick"


def test_stop_strings_end_a_completion(oai: openai.OpenAI) -> None:
    done = oai.completions.create(model="mock", prompt=PROMPT, stop=[" fox"])
    assert done.choices[0].text == "the quick brown"
    assert done.choices[0].finish_reason == "stop"


def test_streamed_completion_with_logprobs_and_usage(oai: openai.OpenAI) -> None:
    chunks = list(
        oai.completions.create(
            model="mock",
            prompt=PROMPT,
            stream=True,
            logprobs=2,
            stream_options={"include_usage": True},
        )
    )
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == PROMPT
    assert text_chunks[-1].choices[0].finish_reason == "stop"
    tokens, offsets = [], []
    for c in text_chunks:
        lp = c.choices[0].logprobs
        if lp is not None:
            assert lp.tokens is not None and lp.text_offset is not None
            assert lp.top_logprobs is not None and lp.token_logprobs is not None
            tokens += lp.tokens
            offsets += lp.text_offset
            for token, top, value in zip(
                lp.tokens, lp.top_logprobs, lp.token_logprobs, strict=True
            ):
                assert len(top) == 2 and max(top.values()) == value and top[token] == value
    assert "".join(tokens) == PROMPT
    assert offsets == [PROMPT.index(t, o) for t, o in zip(tokens, offsets, strict=True)]
    assert offsets[0] == 0 and offsets == sorted(offsets)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5


def test_non_streamed_logprobs_have_the_legacy_columns(oai: openai.OpenAI) -> None:
    done = oai.completions.create(model="mock", prompt=PROMPT, logprobs=3)
    lp = done.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None
    assert "".join(lp.tokens) == PROMPT
    assert lp.text_offset == [0, 3, 9, 15, 19]
    assert all(v <= 0 for v in lp.token_logprobs)
    assert lp.top_logprobs is not None and all(len(t) == 3 for t in lp.top_logprobs)


# -- logprobs on chat ----------------------------------------------------------------------
def say(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_chat_logprobs_not_streamed(oai: openai.OpenAI) -> None:
    done = oai.chat.completions.create(
        model="mock",
        messages=say(PROMPT),
        logprobs=True,
        top_logprobs=4,  # type: ignore[arg-type]
    )
    content = done.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None
    assert "".join(t.token for t in content) == PROMPT
    for t in content:
        assert t.bytes == list(t.token.encode())
        assert len(t.top_logprobs) == 4
        values = [a.logprob for a in t.top_logprobs]
        assert values == sorted(values, reverse=True) and values[0] == t.logprob <= 0
        assert t.top_logprobs[0].token == t.token


def test_chat_logprobs_streamed_match_the_text(oai: openai.OpenAI) -> None:
    chunks = list(
        oai.chat.completions.create(
            model="mock",
            messages=say(PROMPT),  # type: ignore[arg-type]
            logprobs=True,
            stream=True,
        )
    )
    tokens = [
        t.token for c in chunks if c.choices and c.choices[0].logprobs
        for t in c.choices[0].logprobs.content or []
    ]  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "".join(tokens) == text == PROMPT


def test_chat_without_logprobs_has_none(oai: openai.OpenAI) -> None:
    done = oai.chat.completions.create(model="mock", messages=say(PROMPT))  # type: ignore[arg-type]
    assert done.choices[0].logprobs is None


# -- n and seed ----------------------------------------------------------------------------
def test_n_gives_that_many_choices(oai: openai.OpenAI) -> None:
    done = oai.chat.completions.create(model="mock", messages=say(PROMPT), n=2)  # type: ignore[arg-type]
    assert [c.index for c in done.choices] == [0, 1]
    assert all(c.message.content == PROMPT for c in done.choices)
    assert done.usage is not None and done.usage.completion_tokens == 10
    text = oai.completions.create(model="mock", prompt=["a b", "c"], n=2)
    assert [c.text for c in text.choices] == ["a b", "a b", "c", "c"]


def test_n_streamed_ends_every_choice(oai: openai.OpenAI) -> None:
    chunks = list(
        oai.chat.completions.create(model="mock", messages=say(PROMPT), n=2, stream=True)  # type: ignore[arg-type]
    )
    texts = {0: "", 1: ""}
    finishes = {}
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert texts == {0: PROMPT, 1: PROMPT} and finishes == {0: "stop", 1: "stop"}


async def test_more_choices_than_the_server_holds_is_a_400_naming_n(
    client: httpx.AsyncClient, srv: Server
) -> None:
    response = await client.post("/v1/completions", json={"prompt": PROMPT, "n": 5})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "n" and "5 choices" in error["message"]
    response = await client.post("/v1/completions", json={"prompt": ["a", "b", "c"], "n": 2})
    assert response.status_code == 400 and "6 choices" in response.json()["error"]["message"]
    assert_nothing_held(srv)


def test_four_choices_fill_the_four_places(oai: openai.OpenAI) -> None:
    done = oai.completions.create(model="mock", prompt=PROMPT, n=4)
    assert [c.text for c in done.choices] == [PROMPT] * 4


# -- /v1/models ----------------------------------------------------------------------------
def test_models_report_the_context_window_and_one_can_be_retrieved(oai: openai.OpenAI) -> None:
    (entry,) = oai.models.list().data
    assert entry.id == "mock" and entry.model_extra == {
        "context_window": 4096,
        "engine": {"runner": "mock", "mode": "echo"},
    }
    assert oai.models.retrieve("mock").id == "mock"
    with pytest.raises(openai.NotFoundError) as caught:
        oai.models.retrieve("no-such-model")
    assert caught.value.body["type"] == "not_found"  # type: ignore[index]


# -- bad input -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"messages": say("x"), "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/chat/completions", {"messages": say("x"), "top_logprobs": 2}, None),
        ("/v1/chat/completions", {"messages": say("x"), "n": 0}, "n"),
        ("/v1/completions", {"prompt": ""}, "prompt"),
        ("/v1/completions", {"prompt": []}, "prompt"),
        ("/v1/completions", {"prompt": [[1], []]}, "prompt"),
        ("/v1/completions", {"prompt": [10**9]}, "prompt"),
        ("/v1/completions", {"prompt": [-1]}, "prompt"),
        ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
        ("/v1/completions", {"prompt": "x", "n": 0}, "n"),
        ("/v1/completions", {"prompt": "x", "echo": True, "logprobs": 1}, "echo"),
        ("/v1/completions", {"prompt": "x", "model": "other"}, "model"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 5.0}, "max_tokens"),
    ],
)  # fmt: skip
async def test_bad_input_is_a_400_in_openais_shape_and_leaks_nothing(
    client: httpx.AsyncClient, srv: Server, path: str, body: dict[str, object], param: str | None
) -> None:
    response = await client.post(path, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    if param is not None:  # the field, or a part of it ("prompt.0")
        assert error["param"].split(".")[0] == param
    assert_nothing_held(srv)

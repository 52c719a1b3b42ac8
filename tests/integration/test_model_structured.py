"""Structured output on the real default model (SmolLM2-135M-Instruct, CPU) with its real
tokenizer, behind the real server, over real HTTP: every constrained reply is valid, whatever the
schema and the seed; a forced tool call is a call of the tool, with arguments that fit."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Literal

import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field

from tests.support.http import assert_no_server_errors
from tests.support.servers import Server, running_server

TIMEOUT_S = 500.0  # a safety net for a slow, shared CPU, never a measurement
MODEL = "SmolLM2-135M-Instruct-Q4_1"
SEEDS = (1, 2, 3)

pytestmark = pytest.mark.model


# Bounded strings, lists and numbers: a 135M model given free rein inside a string (or a number's
# digits) may never close it, and a reply cut by max_tokens is the one allowed to be invalid.
class City(BaseModel):
    model_config = ConfigDict(extra="forbid")  # additionalProperties: false
    name: str = Field(max_length=24)
    country: str = Field(max_length=24)
    population: int = Field(ge=0, le=10**9)


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")  # additionalProperties: false
    title: str = Field(max_length=32)
    servings: int = Field(ge=1, le=12)
    vegetarian: bool
    steps: list[Annotated[str, Field(max_length=40)]] = Field(max_length=3)


class Ticket(BaseModel):
    model_config = ConfigDict(extra="forbid")  # additionalProperties: false
    priority: Literal["low", "medium", "high"]
    tags: list[Literal["bug", "feature", "docs"]] = Field(max_length=3)
    estimate_hours: Annotated[int, Field(ge=0, le=1000)] | None


SCHEMAS: list[tuple[type[BaseModel], str]] = [
    (City, "Describe the capital of France."),
    (Recipe, "Give me a recipe for pancakes."),
    (Ticket, "File a ticket: the login page crashes."),
]


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(
        "--max-concurrent", "8", tmp_path=tmp_path_factory.mktemp("structured")
    ) as server:
        yield server
    assert_no_server_errors(server.log())


@pytest.fixture(scope="module")
def oai(srv: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=f"{srv.url}/v1", api_key="x", max_retries=0, timeout=TIMEOUT_S
    ) as c:
        yield c


@pytest.mark.timeout(600)
def test_json_schema_replies_are_valid_for_every_seed(oai: openai.OpenAI) -> None:
    """Every schema with every seed, sent together (they share the batch)."""

    def ask(model: type[BaseModel], question: str, seed: int) -> None:
        completion = oai.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": question}],
            response_format={
                "type": "json_schema",
                "json_schema": {
                    "name": model.__name__,
                    "schema": model.model_json_schema(),
                    "strict": True,
                },
            },
            temperature=1.0,
            seed=seed,
            max_tokens=256,  # more than the longest reply each schema allows
        )
        [choice] = completion.choices
        where = (model.__name__, seed, choice.message.content)
        assert choice.finish_reason == "stop", where
        model.model_validate_json(choice.message.content or "")

    with ThreadPoolExecutor(len(SCHEMAS) * len(SEEDS)) as pool:
        asks = [pool.submit(ask, m, q, seed) for m, q in SCHEMAS for seed in SEEDS]
        for done in asks:
            done.result()


@pytest.mark.timeout(300)
def test_json_object_is_an_object(oai: openai.OpenAI) -> None:
    completion = oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "List two colors as JSON."}],
        response_format={"type": "json_object"},
        n=2,
        seed=7,
        max_tokens=120,
    )
    for choice in completion.choices:
        if choice.finish_reason == "stop":  # only max_tokens may cut a reply short
            assert isinstance(json.loads(choice.message.content or ""), dict)
        else:
            assert choice.finish_reason == "length"


@pytest.mark.timeout(300)
def test_forced_tool_call_fits_its_schema(oai: openai.OpenAI) -> None:
    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": City.model_json_schema(),
        },
    }
    completion = oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[weather],  # type: ignore[list-item]
        tool_choice="required",
        parallel_tool_calls=False,
        seed=5,
        max_tokens=200,
    )
    [choice] = completion.choices
    assert choice.finish_reason == "tool_calls", choice.message
    [call] = choice.message.tool_calls or []
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    City.model_validate_json(call.function.arguments)  # type: ignore[union-attr]

"""Real clients over real HTTP against a mock-engine server: the `openai` SDK, LangChain's
ChatOpenAI, lm-evaluation-harness and guidellm. The mock's replies are known (echo; a constrained
row takes the first token its grammar allows in a fixed order), so what each client does with
them can be checked exactly. Structured output with a real tokenizer: test_model_structured.py."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from pydantic import BaseModel

from tests.support.http import SAFETY_S, assert_no_server_errors, error_of
from tests.support.servers import Server, running_server

BIN = Path(sys.executable).parent
TASK_DIR = Path(__file__).with_name("lm_eval_task")
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
CLIENT_TIMEOUT_S = 300  # a safety net for a loaded 2-core machine, never a measurement

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city", "days"],
        },
    },
}


class Person(BaseModel):
    name: str
    age: int
    languages: list[str]


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    flags = (
        "--engine", "mock", "--mock-delay", "0.002",
        "--max-concurrent", "16", "--max-queue-size", "512",
    )  # fmt: skip
    with running_server(*flags, tmp_path=tmp_path_factory.mktemp("clients")) as server:
        yield server
    assert_no_server_errors(server.log())


@pytest.fixture
def oai(srv: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0, timeout=SAFETY_S) as c:
        yield c
    srv.wait_idle()


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local tokenizer folder for the clients that count tokens (never the hub)."""
    from tests.support.tiny_tokenizer import tiny_tokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    tiny_tokenizer().save_pretrained(folder)
    return folder


def say(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


# -- the openai SDK ------------------------------------------------------------------------------
def test_parse_returns_a_reply_that_validates(oai: openai.OpenAI) -> None:
    completion = oai.chat.completions.parse(
        model="mock", messages=say("who wrote the first program?"), response_format=Person
    )
    [choice] = completion.choices
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Person)
    assert Person.model_validate_json(choice.message.content or "") == choice.message.parsed


def test_json_object_streams_a_json_object(oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model="mock",
        messages=say("anything"),
        response_format={"type": "json_object"},
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert isinstance(json.loads(text), dict)


def test_streamed_tool_call_when_required(oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model="mock",
        messages=say("weather in Paris?"),
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="required",
        stream=True,
    )
    deltas, finish = [], None
    for chunk in stream:
        if chunk.choices:
            deltas += chunk.choices[0].delta.tool_calls or []
            finish = chunk.choices[0].finish_reason or finish
    first, rest = deltas[0], deltas[1:]
    assert first.id and first.type == "function" and first.function
    assert first.function.name == "get_weather" and first.function.arguments == ""
    assert rest, "the arguments come in fragments after the name"
    assert all(d.index == 0 and d.id is None and d.function for d in rest)
    arguments = json.loads("".join(d.function.arguments or "" for d in rest if d.function))
    assert set(arguments) == {"city", "days"} and isinstance(arguments["days"], int)
    assert finish == "tool_calls"


def test_named_function_is_called(oai: openai.OpenAI) -> None:
    other = {"type": "function", "function": {"name": "get_time", "parameters": {}}}
    completion = oai.chat.completions.create(
        model="mock",
        messages=say("what time is it?"),
        tools=[WEATHER, other],  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )
    [choice] = completion.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls or []
    assert call.type == "function" and call.function.name == "get_time"  # type: ignore[union-attr]
    assert isinstance(json.loads(call.function.arguments), dict)  # type: ignore[union-attr]


def test_tool_call_parsed_from_the_reply_and_answered(oai: openai.OpenAI) -> None:
    """With tool_choice auto nothing is forced: the mock echoes a call in the Hermes format,
    which comes back as a call; the conversation then goes on with the call and its result."""
    written = (
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}</tool_call>'
    )
    completion = oai.chat.completions.create(
        model="mock",
        messages=say(written),
        tools=[WEATHER],  # type: ignore[list-item]
    )
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "tool_calls"
    [call] = message.tool_calls or []
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(call.function.arguments) == {"city": "Oslo", "days": 2}  # type: ignore[union-attr]
    follow_up = oai.chat.completions.create(
        model="mock",
        messages=[
            *say("weather in Oslo?"),
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
        ],  # type: ignore[list-item]
        tools=[WEATHER],  # type: ignore[list-item]
    )
    # the mock echoes the last user turn: the tool's result, as the template-less prompt wrote it
    assert "sunny, 21 C" in (follow_up.choices[0].message.content or "")


def test_n_2_gives_two_choices(oai: openai.OpenAI) -> None:
    completion = oai.chat.completions.create(model="mock", messages=say("two of these"), n=2)
    assert [c.index for c in completion.choices] == [0, 1]
    assert [c.message.content for c in completion.choices] == ["two of these"] * 2


def test_completions_with_logprobs(oai: openai.OpenAI) -> None:
    completion = oai.completions.create(
        model="mock", prompt="the quick brown fox", max_tokens=3, logprobs=2
    )
    [choice] = completion.choices
    assert choice.text == "the quick brown" and choice.finish_reason == "length"
    logprobs = choice.logprobs
    assert logprobs is not None and logprobs.tokens == ["the", " quick", " brown"]
    assert len(logprobs.token_logprobs or []) == 3
    assert [len(top) for top in logprobs.top_logprobs or []] == [2, 2, 2]


def test_completions_take_response_format(srv: Server) -> None:
    body = {"prompt": "x", "response_format": {"type": "json_object"}, "max_tokens": 64}
    response = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=SAFETY_S)
    assert response.status_code == 200
    assert isinstance(json.loads(response.json()["choices"][0]["text"]), dict)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}}, "response_format"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ],
)  # fmt: skip
def test_what_cannot_be_honoured_is_a_400(srv: Server, extra: dict[str, Any], param: str) -> None:
    body = {"messages": say("hi"), **extra}
    response = httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=SAFETY_S)
    assert response.status_code == 400
    error = error_of(response)
    assert error["type"] == "invalid_request_error" and error["param"] == param


# -- LangChain -----------------------------------------------------------------------------------
@pytest.fixture
def chat_model(srv: Server) -> Any:
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        base_url=f"{srv.url}/v1", api_key="x", model="mock", max_retries=0, timeout=SAFETY_S
    )


def test_langchain_streams(chat_model: Any) -> None:
    chunks = list(chat_model.stream("tokens arrive one by one"))
    assert len(chunks) > 1
    assert "".join(str(c.content) for c in chunks) == "tokens arrive one by one"


def test_langchain_structured_output(chat_model: Any) -> None:
    result = chat_model.with_structured_output(Person).invoke("who wrote the first program?")
    assert isinstance(result, Person)


def test_langchain_bind_tools_makes_a_tool_call(chat_model: Any) -> None:
    def get_weather(city: str, days: int) -> str:
        """The weather in a city for the next days."""
        return "sunny"

    message = chat_model.bind_tools([get_weather], tool_choice="any").invoke("weather in Rome?")
    [call] = message.tool_calls
    assert call["name"] == "get_weather" and set(call["args"]) == {"city", "days"}


# -- lm-evaluation-harness -----------------------------------------------------------------------
@pytest.mark.timeout(CLIENT_TIMEOUT_S + 60)
@pytest.mark.parametrize("kind", ["local-completions", "local-chat-completions"])
def test_lm_eval_runs_to_a_score(
    srv: Server, tokenizer_folder: Path, tmp_path: Path, kind: str
) -> None:
    """The task (shipped in lm_eval_task/) asks for each prompt said again: the mock's echo
    scores 1.0, through either API."""
    for f in TASK_DIR.iterdir():
        shutil.copy(f, tmp_path)
    route = "completions" if kind == "local-completions" else "chat/completions"
    model_args = f"base_url={srv.url}/v1/{route},model=mock,num_concurrent=2,max_retries=1"
    extra = ["--apply_chat_template"]
    if kind == "local-completions":  # counts tokens with the local tokenizer, sends text
        model_args += f",tokenizer_backend=huggingface,tokenizer={tokenizer_folder}"
        model_args += ",tokenized_requests=False"
        extra = []
    argv = [
        str(BIN / "lm_eval"), "--model", kind, "--model_args", model_args, *extra,
        "--tasks", "chatqueue_echo", "--include_path", str(tmp_path),
        "--output_path", str(tmp_path / "out"),
    ]  # fmt: skip
    run = subprocess.run(
        argv,
        cwd=tmp_path,
        env={**os.environ, **OFFLINE},
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT_S,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    [results] = (tmp_path / "out").rglob("results_*.json")
    scores = json.loads(results.read_text())["results"]["chatqueue_echo"]
    assert scores["exact_match,none"] == 1.0


# -- guidellm ------------------------------------------------------------------------------------
GUIDELLM_ATTEMPT_S = 150  # a run takes 15-50 s on two loaded cores; a request's read limit is 60


def _guidellm(argv: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess[str], bool]:
    """Run guidellm; True beside its output where it hung past GUIDELLM_ATTEMPT_S. A hung run is
    sent SIGABRT first, with Python's fault handler on, so its output ends with every thread's
    stack (its worker processes' too): where it waited."""
    # NOTE: one worker process: guidellm spawns ten per benchmark by default, each importing
    # it anew (a minute a benchmark on two cores)
    env = {
        **os.environ, **OFFLINE, "GUIDELLM__MAX_WORKER_PROCESSES": "1", "PYTHONFAULTHANDLER": "1",
    }  # fmt: skip
    proc = subprocess.Popen(
        argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=GUIDELLM_ATTEMPT_S)
        return subprocess.CompletedProcess(argv, proc.returncode, out), False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGABRT)
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # a worker left behind
        return subprocess.CompletedProcess(argv, proc.returncode, out), True


@pytest.mark.timeout(2 * (GUIDELLM_ATTEMPT_S + 30) + 60)
def test_guidellm_sweep_completes_without_errors(
    srv: Server, tokenizer_folder: Path, tmp_path: Path
) -> None:
    """guidellm's sweep: every request it makes succeeds. A request our server left hanging fails
    it (guidellm's read limit makes it an error). guidellm itself sometimes stalls between its
    benchmarks with nothing sent (vllm-project/guidellm#431, #1152): a run that hangs while our
    server has nothing in flight is run once more, its stacks kept in a warning."""
    report = tmp_path / "guidellm.json"
    argv = [
        str(BIN / "guidellm"), "run",
        "--backend", f"kind=openai_http,target={srv.url},model=mock,timeout=60",
        "--profile", "kind=sweep,sweep_size=3,max_concurrency=8",
        "--constraint", "kind=max_duration,seconds=1",
        "--data", "kind=synthetic_text,prompt_tokens=32,output_tokens=16",
        "--tokenizer", f"kind=hf_auto,model={tokenizer_folder}",
        "--output", f"kind=json,path={report}",
        "--disable-progress",
    ]  # fmt: skip
    run, hung = _guidellm(argv, tmp_path)
    if hung:
        load = srv.wait_idle()  # raises where our server still holds guidellm's requests
        warnings.warn(
            f"guidellm hung with the server idle ({load}); run again. Its end:\n{run.stdout[-6000:]}",
            stacklevel=1,
        )
        run, hung = _guidellm(argv, tmp_path)
    assert not hung, (
        f"guidellm hung twice; server /load {srv.load()}; its end:\n{run.stdout[-6000:]}"
    )
    assert run.returncode == 0, run.stdout[-6000:]
    benchmarks = json.loads(report.read_text())["benchmarks"]
    assert len(benchmarks) == 3  # synchronous, throughput and one constant rate
    for benchmark in benchmarks:
        made = benchmark["scheduler_metrics"]["requests_made"]
        assert made["errored"] == 0 and made["successful"] > 0, made

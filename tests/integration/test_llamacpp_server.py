"""The default model behind the real server as a newcomer gets it on a CPU: `chatqueue serve`
with no engine named picks llama.cpp for the GGUF, in its own model process, over real HTTP."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.test_model_server import complete, finish_of, text_of
from tests.support.http import assert_no_server_errors
from tests.support.servers import Server, model_process, running_server

TIMEOUT_S = 120.0  # a safety net for the slow, shared CPU, never a measurement

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(
        "--max-concurrent", "4", "--device", "cpu", tmp_path=tmp_path_factory.mktemp("llamacpp")
    ) as server:
        yield server
    assert_no_server_errors(server.log())


def test_auto_serves_the_gguf_on_llamacpp(srv: Server) -> None:
    models = httpx.get(f"{srv.url}/v1/models", timeout=TIMEOUT_S).json()["data"]
    # llama.cpp's slots hold 4096 tokens by default; the transformers runner reports SmolLM2's 8192
    assert [m["context_window"] for m in models] == [4096]
    # llama.cpp runs in the model process, not in the server's
    child = model_process(srv.process.pid)
    assert "libllama" in Path(f"/proc/{child}/maps").read_text()
    assert "libllama" not in Path(f"/proc/{srv.process.pid}/maps").read_text()


async def test_replies_together_and_again_after_the_model_process_is_killed(srv: Server) -> None:
    async with httpx.AsyncClient(base_url=srv.url, timeout=TIMEOUT_S) as client:
        questions = ["What is 2+2?", "Name a color.", "Hi"]
        first = await asyncio.gather(
            *(complete(client, q, temperature=0, max_tokens=24) for q in questions)
        )
        assert "4" in text_of(first[0]) and finish_of(first[0]) == "stop"
        os.kill(model_process(srv.process.pid), signal.SIGKILL)
        deadline = time.monotonic() + TIMEOUT_S
        while (health := await client.get("/health")).status_code != 200 or (
            "last_model_exit" not in health.json()
        ):
            assert time.monotonic() < deadline, "the model process did not come back"
            await asyncio.sleep(0.05)
        again = await complete(client, questions[0], temperature=0, max_tokens=24)
    assert text_of(again) == text_of(first[0])
    assert health.json()["last_model_exit"] == "exited (killed by SIGKILL)"


def test_the_next_turn_reports_the_prompt_tokens_its_slot_held(srv: Server) -> None:
    """llama.cpp finds its prefix reuse itself (a slot's cache): the client still hears of it,
    as OpenAI's `cached_tokens`, and /metrics counts it."""

    def ask(messages: list[dict[str, str]]) -> dict[str, Any]:
        body = {"messages": messages, "temperature": 0, "max_tokens": 16}
        reply = httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=TIMEOUT_S)
        assert reply.status_code == 200, reply.text
        answer: dict[str, Any] = reply.json()
        return answer

    def metric(name: str) -> float:
        text = httpx.get(f"{srv.url}/metrics", timeout=TIMEOUT_S).text
        return float(re.search(rf"^{name} (\S+)$", text, re.M)[1])  # type: ignore[index]

    def counted() -> float:
        return metric("chatqueue_cached_prompt_tokens_total")

    first = [
        {"role": "system", "content": "You are a terse assistant. " * 8},
        {"role": "user", "content": "Name three rivers in Europe."},
    ]
    before = counted()
    one = ask(first)
    said = one["choices"][0]["message"]["content"]
    two = ask(
        [*first, {"role": "assistant", "content": said}, {"role": "user", "content": "More?"}]
    )

    cached = two["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert one["usage"]["prompt_tokens"] - 4 <= cached < two["usage"]["prompt_tokens"]
    assert counted() - before >= cached
    # and the share of prompt tokens found cached, on /load and /metrics, as a pool's hit rate
    load = httpx.get(f"{srv.url}/load", timeout=TIMEOUT_S).json()
    rate = load["prefix_hit_rate"]
    assert 0 < rate < 1
    assert metric("chatqueue_prefix_cache_hit_rate") == pytest.approx(rate, abs=1e-3)
    # what the prefill budget learned from the model process's steps, on /load: a decode step's
    # time and a prompt token's, from which a step's prompt tokens beside decode follow
    prefill = load["prefill"]
    assert (prefill["most"], prefill["stall_limit"]) == (512, 2.0)  # the defaults
    assert prefill["decode_ms"] > 0 and prefill["prompt_token_ms"] > 0

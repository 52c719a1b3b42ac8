"""Talking to the OpenAI routes over HTTP: request bodies, reading SSE off a socket, /load and
/metrics figures, and polling until something holds."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from chatqueue.engine.mock import LOREM

COMPLETIONS = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "hello"}]
QUEUED = re.compile(r"^queued position=(\d+) eta=(\d+\.\d+s|unknown)$")
SAFETY_S = 10.0  # a safety net against hangs, never a measurement


def lorem(num_words: int) -> str:
    """What `--mock-mode lorem` says in `num_words` tokens."""
    return " ".join((LOREM * (num_words // len(LOREM) + 1))[:num_words])


def chat(*, stream: bool, **fields: Any) -> dict[str, Any]:
    return {"messages": HELLO, "stream": stream, **fields}


@dataclass
class SseEvent:
    """One SSE record: a comment line (`: ...`) or a data line (JSON, or the `[DONE]` marker)."""

    comment: str | None = None
    data: Any = None

    @property
    def is_done(self) -> bool:
        return self.data == "[DONE]"

    @property
    def content(self) -> str:
        """The text a chat.completion.chunk adds ("" for any other record)."""
        if not isinstance(self.data, dict) or not self.data.get("choices"):
            return ""
        return str(self.data["choices"][0]["delta"].get("content") or "")

    @property
    def position(self) -> int | None:
        m = QUEUED.match(self.comment or "")
        return int(m.group(1)) if m else None


async def sse_events(response: httpx.Response) -> AsyncIterator[SseEvent]:
    async for line in response.aiter_lines():
        if line.startswith(":"):
            yield SseEvent(comment=line[1:].strip())
        elif line.startswith("data: "):
            raw = line.removeprefix("data: ")
            yield SseEvent(data=raw if raw == "[DONE]" else json.loads(raw))


@dataclass
class StreamLog:
    """Everything one streamed request received, in order."""

    status: int = 0
    events: list[SseEvent] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(e.content for e in self.events)

    @property
    def positions(self) -> list[int]:
        return [p for e in self.events if (p := e.position) is not None]

    @property
    def chunks(self) -> list[dict[str, Any]]:
        return [e.data for e in self.events if isinstance(e.data, dict)]


async def read_stream(
    client: httpx.AsyncClient,
    body: dict[str, Any],
    on_event: Callable[[SseEvent], None] | None = None,
) -> StreamLog:
    """POST a streamed chat completion and read it to the end."""
    log = StreamLog()
    async with client.stream("POST", COMPLETIONS, json=body) as response:
        log.status = response.status_code
        async for event in sse_events(response):
            log.events.append(event)
            if on_event is not None:
                on_event(event)
    return log


class OpenStream:
    """A streamed request held open by the test, read as far as it likes, then closed (the
    client going away)."""

    def __init__(self, client: httpx.AsyncClient, body: dict[str, Any]) -> None:
        self._cm = client.stream("POST", COMPLETIONS, json=body)
        self.log = StreamLog()
        self._events: AsyncIterator[SseEvent] | None = None

    async def __aenter__(self) -> OpenStream:
        response = await self._cm.__aenter__()
        self.log.status = response.status_code
        self._events = sse_events(response)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._cm.__aexit__(None, None, None)

    async def read_until(self, is_wanted: Callable[[SseEvent], bool]) -> SseEvent:
        assert self._events is not None
        async with asyncio.timeout(SAFETY_S):
            async for event in self._events:
                self.log.events.append(event)
                if is_wanted(event):
                    return event
        raise AssertionError(f"stream ended first: {self.log}")

    async def read_to_end(self) -> StreamLog:
        assert self._events is not None
        async with asyncio.timeout(SAFETY_S):
            async for event in self._events:
                self.log.events.append(event)
        return self.log

    async def close(self) -> None:
        await self.__aexit__()


def is_queued(event: SseEvent) -> bool:
    return event.position is not None


def has_content(event: SseEvent) -> bool:
    return bool(event.content)


async def load(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/load")
    assert response.status_code == 200
    return dict(response.json())


async def until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll `check` until it holds; fail with `what` after the safety net."""
    deadline = time.monotonic() + SAFETY_S
    while not await check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


async def wait_load(client: httpx.AsyncClient, **expected: int) -> dict[str, Any]:
    """Poll /load until the named fields hold the given values (e.g. processing=0)."""
    deadline = time.monotonic() + SAFETY_S
    while True:
        now = await load(client)
        if all(now[k] == v for k, v in expected.items()):
            return now
        assert time.monotonic() < deadline, f"/load never showed {expected}: {now}"
        await asyncio.sleep(0.01)


def metric(text: str, name: str, **labels: str) -> float:
    """One sample from Prometheus text; 0 when absent (a counter not yet touched)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, _, value = line.rpartition(" ")
        sample, _, rest = key.partition("{")
        found = ",".join(sorted(rest.rstrip("}").split(","))) if rest else ""
        if sample == name and found == want:
            return float(value)
    return 0.0


async def metrics(client: httpx.AsyncClient) -> str:
    response = await client.get("/metrics")
    assert response.status_code == 200
    return response.text


def assert_no_server_errors(log: str) -> None:
    """A bad input or a client that went away is never a crash in the server's log."""
    assert "Traceback" not in log and " 500 " not in log, log


def error_of(response: httpx.Response) -> dict[str, Any]:
    """The OpenAI error object, after checking its shape."""
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    return dict(error)

"""One chat completion, streamed or not, sent and read to the end, whatever its outcome: what the
load, fault and access tests compare."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.support.http import COMPLETIONS, SseEvent, error_of, sse_events


@dataclass
class Outcome:
    status: int
    error: dict[str, Any] | None = None  # a refusal's body, or a stream's error chunk
    events: list[SseEvent] = field(default_factory=list)
    plain_text: str | None = None  # a non-streamed reply's content

    @property
    def text(self) -> str:
        if self.plain_text is not None:
            return self.plain_text
        return "".join(e.content for e in self.events)

    @property
    def positions(self) -> list[int]:
        return [p for e in self.events if (p := e.position) is not None]

    @property
    def ends_with_done(self) -> bool:
        return bool(self.events) and self.events[-1].is_done


def user_says(text: str, *, stream: bool, **fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], "stream": stream, **fields}


async def send(
    client: httpx.AsyncClient,
    body: dict[str, Any],
    *,
    headers: dict[str, str] | None = None,
    on_event: Callable[[SseEvent], None] | None = None,
) -> Outcome:
    if not body.get("stream"):
        r = await client.post(COMPLETIONS, json=body, headers=headers)
        if r.status_code != 200:
            return Outcome(r.status_code, error=error_of(r))
        return Outcome(200, plain_text=r.json()["choices"][0]["message"]["content"])
    async with client.stream("POST", COMPLETIONS, json=body, headers=headers) as r:
        if r.status_code != 200:
            await r.aread()
            return Outcome(r.status_code, error=error_of(r))
        out = Outcome(200)
        async for event in sse_events(r):
            out.events.append(event)
            if isinstance(event.data, dict) and "error" in event.data:
                out.error = event.data["error"]
            if on_event is not None:
                on_event(event)
        return out

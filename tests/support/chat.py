"""Talking to the chat product: POST /chat and reading its SSE events."""

from __future__ import annotations

import json
from typing import Any

import httpx

from tests.support.http import SAFETY_S


def sse_events(text: str) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) for each event of a whole SSE body."""
    events = []
    for block in text.split("\n\n"):
        lines = block.splitlines()
        name = next((ln[6:].strip() for ln in lines if ln.startswith("event:")), "message")
        data = [ln[5:].strip() for ln in lines if ln.startswith("data:")]
        if data:
            events.append((name, json.loads("\n".join(data))))
    return events


def reply_text(events: list[tuple[str, dict[str, Any]]]) -> str:
    return "".join(d["text"] for name, d in events if name == "token")


def done_of(events: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    done = [d for name, d in events if name == "done"]
    assert len(done) == 1, events
    return done[0]


def chat(client: httpx.Client, message: str, **fields: Any) -> list[tuple[str, dict[str, Any]]]:
    """POST /chat and read the whole stream."""
    res = client.post("/chat", json={"message": message, **fields}, timeout=SAFETY_S)
    assert res.status_code == 200, res.text
    return sse_events(res.text)

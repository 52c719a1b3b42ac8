"""What the chat product's tests share: a real Redis on a free port, reading POST /chat's SSE."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from tests.serving import free_port

SAFETY_S = 10.0  # a safety net against hangs, never a measurement


@contextmanager
def redis_server() -> Iterator[str]:
    """`redis-server` on a free port, nothing saved; yields its redis:// URL."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not installed (make test installs it)")
    port = free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_port(port, proc)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


def _wait_for_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    import socket

    deadline = time.monotonic() + SAFETY_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("redis-server exited early")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError("redis-server did not start")


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

"""`chatqueue chat`: the console chat in-process and against a running server's /chat."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.support.servers import CHATQUEUE, running_server

SAFETY_S = 60.0  # a safety net against hangs, never a measurement


def console(*args: str, typed: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CHATQUEUE, "chat", *args],
        input=typed,
        capture_output=True,
        text=True,
        timeout=SAFETY_S,
        env={"CHATQUEUE_DATA": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )


def test_in_process_chat_streams_replies(tmp_path: Path) -> None:
    typed = "hello console\nsecond line\n/new\nthird\n/quit\n"
    done = console("--engine", "mock", "--mock-delay", "0", typed=typed, tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    replies = [re.sub(r"^(> )+", "", ln).strip() for ln in done.stdout.split("\n")]
    assert [r for r in replies if r] == ["hello console", "second line", "third"]


def test_chat_against_a_running_server(tmp_path: Path) -> None:
    with running_server(
        "--engine", "mock", "--mock-delay", "0", "--history", "memory", tmp_path=tmp_path
    ) as server:
        done = console("--url", server.url, typed="over the wire\n", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "over the wire" in done.stdout

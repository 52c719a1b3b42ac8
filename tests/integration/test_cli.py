"""The CLI: `bench` against a real server; flags and CHATQUEUE_* environment."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from chatqueue.cli import _settings
from tests.support.servers import CHATQUEUE, running_server


def test_bench_reports_what_the_clients_saw(tmp_path: Path) -> None:
    args = (
        "--engine",
        "mock",
        "--mock-mode",
        "lorem",
        "--mock-lorem-tokens",
        "5",
        "--mock-delay",
        "0.001",
        "--max-concurrent",
        "2",
        "--max-queue-size",
        "2",
    )
    with running_server(*args, tmp_path=tmp_path) as srv:
        out = subprocess.run(
            [CHATQUEUE, "bench", "--url", srv.url, "--requests", "8", "--concurrency", "4"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
    assert "requests 8: 8 ok, 0 refused (429), 0 failed" in out
    assert "output tokens 40:" in out


def test_flags_win_over_environment_which_wins_over_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CHATQUEUE_MAX_CONCURRENT", "3")
    monkeypatch.setenv("CHATQUEUE_MAX_QUEUE_SIZE", "7")
    s = _settings(max_concurrent=5, max_queue_size=None)
    assert (s.max_concurrent, s.max_queue_size, s.shutdown_timeout) == (5, 7, 30.0)


def test_bad_settings_exit_2_with_a_clear_message() -> None:
    r = subprocess.run(
        [CHATQUEUE, "serve", "--max-concurrent", "0"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2 and "max_concurrent" in r.stderr


def test_the_deprecated_flag_is_told_once_on_stderr() -> None:
    r = subprocess.run(
        [CHATQUEUE, "serve", "--max-queue", "7", "--max-concurrent", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "error: max_concurrent" in r.stderr
    assert r.stderr.count("deprecated") == 1
    assert "warning: max_queue (--max-queue, CHATQUEUE_MAX_QUEUE) is deprecated" in r.stderr

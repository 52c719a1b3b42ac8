"""tests/unit runs with no network, no Redis, no browser, no model and no server process. A test
that opens an internet socket or starts a process fails here at once, rather than passing on a
machine that happens to have what it needs; such a test belongs in tests/integration."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable
from typing import Any

import pytest

_INTERNET = (socket.AF_INET, socket.AF_INET6)


def _refuse(what: str) -> AssertionError:
    return AssertionError(f"a unit test {what}: move it to tests/integration")


def _internet_only(method: Callable[..., Any], what: str) -> Callable[..., Any]:
    # NOTE: the event loop talks to itself over a local socketpair; only internet sockets are refused.
    def guarded(sock: socket.socket, *args: Any, **kwargs: Any) -> Any:
        if sock.family in _INTERNET:
            raise _refuse(what)
        return method(sock, *args, **kwargs)

    return guarded


@pytest.fixture(autouse=True)
def _no_network_no_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("connect", "connect_ex", "bind"):
        method = getattr(socket.socket, name)
        monkeypatch.setattr(socket.socket, name, _internet_only(method, f"called socket.{name}"))

    def no_process(*args: Any, **kwargs: Any) -> None:
        raise _refuse(f"started a process: {args[1] if len(args) > 1 else kwargs.get('args')}")

    monkeypatch.setattr(subprocess.Popen, "__init__", no_process)

"""Real servers on free ports: `chatqueue serve` for tests that talk HTTP to it, `redis-server`
for the Redis history store."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support.http import SAFETY_S

CHATQUEUE = str(Path(sys.executable).with_name("chatqueue"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def load(self) -> dict[str, object]:
        return dict(httpx.get(f"{self.url}/load", timeout=10).json())

    def wait_idle(self, timeout_s: float = 10.0) -> dict[str, object]:
        """Until /load shows nothing running or waiting; returns that /load."""
        deadline = time.monotonic() + timeout_s
        while True:
            load = self.load()
            if load["processing"] == 0 and load["waiting"] == 0:
                return load
            if time.monotonic() > deadline:
                raise AssertionError(f"server not idle after {timeout_s} s: {load}")
            time.sleep(0.02)

    def terminate(self, timeout_s: float = 30.0) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout_s)


@contextmanager
def running_server(
    *args: str,
    tmp_path: Path,
    ready_timeout_s: float = 120.0,
    env: dict[str, str] | None = None,
    health_log: list[httpx.Response] | None = None,
) -> Iterator[Server]:
    """Start `chatqueue serve ARGS` on a free port and wait for /health to say ok. Every /health
    answer seen while waiting, from the moment the process starts, is appended to `health_log`."""
    port = free_port()
    log_path = tmp_path / f"server-{port}.log"
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [CHATQUEUE, "serve", "--host", "127.0.0.1", "--port", str(port), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
        )
    server = Server(proc, f"http://127.0.0.1:{port}", log_path)
    try:
        _wait_healthy(server, ready_timeout_s, health_log if health_log is not None else [])
        yield server
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _wait_healthy(server: Server, timeout_s: float, answers: list[httpx.Response]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited early:\n{server.log()}")
        try:
            answers.append(httpx.get(f"{server.url}/health", timeout=2))
            if answers[-1].status_code == 200:
                return
        except httpx.TransportError:
            pass  # not listening yet
        time.sleep(0.05)
    raise TimeoutError(f"server not healthy after {timeout_s} s:\n{server.log()}")


def model_process_pids(parent: int | str = "self") -> list[int]:
    """Pids of `parent`'s children that are model processes (and spares). A thread or a child
    may end while we read /proc: it is no longer there to count."""
    pids = []
    for task in Path(f"/proc/{parent}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            for pid in (task / "children").read_text().split():
                with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                    if b"chatqueue.engine.process.child" in cmdline:
                        pids.append(int(pid))
    return pids


def model_process(server_pid: int) -> int:
    """A server's model process: the oldest of its model-process children (the spare, kept ready
    for a restart, starts after it)."""
    pids = model_process_pids(server_pid)
    return min(pids, key=lambda pid: int(Path(f"/proc/{pid}/stat").read_text().split()[21]))


def api_server_pids(server_pid: int) -> list[int]:
    """Pids of a server's API server processes (`--api-servers N`)."""
    pids = []
    for task in Path(f"/proc/{server_pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            for pid in (task / "children").read_text().split():
                with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                    if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                        pids.append(int(pid))
    return sorted(pids)


def holder_of(client_port: int, pids: list[int]) -> int | None:
    """Which of `pids` holds the server's end of the loopback TCP connection from `client_port`
    (read from /proc: the connection's socket inode, then whose descriptors point at it)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if int(fields[2].rpartition(":")[2], 16) == client_port:
                    inodes.add(f"socket:[{fields[9]}]")
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(FileNotFoundError, ProcessLookupError, OSError):
                    if os.readlink(fd) in inodes:
                        return pid
    return None


@dataclass
class RedisProcess:
    """A `redis-server` the test may stop, start again on the same port, freeze and thaw."""

    argv: list[str]
    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        _wait_for_port(self.port, self.process)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a frozen one could not stop
            self.process.terminate()
            self.process.wait(10)

    def freeze(self) -> None:
        """SIGSTOP: the port still accepts connections, nothing answers."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)


@contextmanager
def redis_process(data_dir: Path | None = None) -> Iterator[RedisProcess]:
    """`redis-server` on a free port. Nothing saved; with `data_dir`, an append-only file there,
    fsynced at every write, so what it held survives a stop and start."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not installed (make test installs it)")
    port = free_port()
    argv = [exe, "--port", str(port), "--save", "", "--bind", "127.0.0.1"]
    if data_dir is None:
        argv += ["--appendonly", "no"]
    else:
        data_dir.mkdir(parents=True, exist_ok=True)
        argv += ["--dir", str(data_dir), "--appendonly", "yes", "--appendfsync", "always"]
    redis = RedisProcess(argv, port)
    redis.start()
    try:
        yield redis
    finally:
        redis.stop()


@contextmanager
def redis_server() -> Iterator[str]:
    """`redis-server` on a free port, nothing saved; yields its redis:// URL."""
    with redis_process() as redis:
        yield redis.url


def _wait_for_port(port: int, proc: subprocess.Popen[bytes]) -> None:
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

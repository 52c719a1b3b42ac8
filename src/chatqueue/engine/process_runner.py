"""The model in its own process: a Runner whose steps cross a socket to a child that holds the model.

NOTE: why. The engine thread and the event loop share one GIL. A step's host work (an eager
prefill forward dispatches thousands of kernels from Python; sampling, bookkeeping) held it for
milliseconds at a time, and /health, new requests and every stream's next SSE write waited for it
(the event-loop lag while 64 requests arrived together on the GPU benchmark). In a child process
the model's Python has its own interpreter; the engine thread only waits on the socket, which
releases the GIL. Scheduling, detokenizing and admission stay in the server process, so nothing
about queueing changes: the child sees `StepBatch`es and answers token ids (vLLM's engine-core
split, one level lower).

The child (`process_child.py`) is a plain `python -m chatqueue.engine.process_child FD`, not
multiprocessing's spawn, which would re-run the embedding app's main module in the child. It
exits when its socket closes, so a server killed outright leaves no model process behind.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import cast

from chatqueue.engine.runner import Runner, RunnerLost, StepBatch, Tokenizer

log = logging.getLogger(__name__)

CLOSE = None  # the message that tells the child to free the model and exit


class ModelLoadError(RuntimeError):
    """Loading the model failed in the child; the message is the child's error."""


class StepError(RuntimeError):
    """A step raised in the child; the runner is still usable (as when it raises in-process)."""


@dataclass(frozen=True, slots=True)
class Ready:
    """The child's first answer: what the server needs of the runner besides its steps."""

    model_name: str
    context_window: int
    tokenizer: Tokenizer


class ProcessRunner:
    """Starts the child, which calls `load()` (a picklable callable: a module-level function or a
    functools.partial of one) and serves steps. Blocks until the model is loaded; raises
    ModelLoadError if it fails. Every method runs on the engine thread; `tokenizer` is a copy
    unpickled here, used by the tokenizer thread and the detokenizer."""

    def __init__(self, load: Callable[[], Runner], *, log_level: str = "info") -> None:
        ours, theirs = socket.socketpair()
        with ours, theirs:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "chatqueue.engine.process_child", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                # the server's import path: chatqueue, and the module `load` comes from, import
                # there as they did here (a source checkout, a benchmark's folder)
                env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
            )
            self._conn = Connection(ours.detach())
        atexit.register(self._kill)  # an engine thread stuck past exit must not orphan the child
        try:
            self._conn.send((load, log_level))
            kind, payload = self._recv()
        except RunnerLost as exc:
            self._kill()
            raise ModelLoadError(str(exc)) from exc
        if kind != "ready":
            self._kill()
            raise ModelLoadError(str(payload))
        self._ready = cast(Ready, payload)

    @property
    def model_name(self) -> str:
        return self._ready.model_name

    @property
    def tokenizer(self) -> Tokenizer:
        return self._ready.tokenizer

    @property
    def context_window(self) -> int:
        return self._ready.context_window

    @property
    def pid(self) -> int:
        return self._proc.pid

    def step(self, batch: StepBatch) -> dict[int, int]:
        try:
            self._conn.send(batch)
        except OSError as exc:
            raise self._lost() from exc
        kind, payload = self._recv()
        if kind == "error":
            raise StepError(str(payload))
        return cast(dict[int, int], payload)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.send(CLOSE)
        try:
            self._proc.wait(30)
        except subprocess.TimeoutExpired:
            log.warning("the model process did not exit in 30 s; killing it")
        self._kill()

    def _recv(self) -> tuple[str, object]:
        try:
            reply: tuple[str, object] = self._conn.recv()
        except (EOFError, OSError) as exc:
            raise self._lost() from exc
        return reply

    def _lost(self) -> RunnerLost:
        try:
            code = self._proc.wait(5)
        except subprocess.TimeoutExpired:
            return RunnerLost("The model process closed its connection.")
        return RunnerLost(f"The model process exited (exit code {code}).")

    def _kill(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._conn.close()
        atexit.unregister(self._kill)

"""The model in its own process: a Runner whose steps cross a socket to a child that holds the model.

NOTE: why. The engine thread and the event loop share one GIL. A step's host work (an eager
prefill forward dispatches thousands of kernels from Python; sampling, bookkeeping) held it for
milliseconds at a time, and /health, new requests and every stream's next SSE write waited for it
(the event-loop lag while 64 requests arrived together on the GPU benchmark). In a child process
the model's Python has its own interpreter; the engine thread only waits on the socket, which
releases the GIL. Scheduling, detokenizing and admission stay in the server process, so nothing
about queueing changes: the child sees `StepBatch`es and answers token ids (vLLM's engine-core
split, one level lower).

The child (`child.py`) is a plain `python -m chatqueue.engine.process.child FD`, not
multiprocessing's spawn, which would re-run the embedding app's main module in the child. It
exits when its socket closes, so a server killed outright leaves no model process behind. The
tokenizer never crosses: the server loads its own (the child has no use for one).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from chatqueue.engine.process.messages import (
    Close,
    Load,
    LoadFailed,
    LoadReply,
    Ready,
    StepDone,
    StepFailed,
    StepReply,
)
from chatqueue.engine.runner import ModelRunner, RunnerLost, StepBatch
from chatqueue.text.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """Loading the model failed in the child; the message is the child's error."""


class StepError(RuntimeError):
    """A step raised in the child; the runner is still usable (as when it raises in-process)."""


class ProcessRunner:
    """A Runner whose model lives in a child process. The child calls `load()` (a picklable
    callable: a module-level function or a functools.partial of one) and serves steps.

    Blocks until the model is loaded; raises ModelLoadError if it fails. Every method runs on the
    engine thread."""

    def __init__(
        self,
        load: Callable[[], ModelRunner],
        *,
        tokenizer: Tokenizer,
        model_name: str,
        log_level: str = "info",
    ) -> None:
        self.tokenizer = tokenizer
        self.model_name = model_name
        self._load = load
        self._log_level = log_level
        self._start()

    def _start(self) -> None:
        ours, theirs = socket.socketpair()
        with ours, theirs:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "chatqueue.engine.process.child", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                # the server's import path: chatqueue, and the module `load` comes from, import
                # there as they did here (a source checkout, a benchmark's folder)
                env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
            )
            self._conn = Connection(ours.detach())
        atexit.register(self._kill)  # an engine thread stuck past exit must not orphan the child
        try:
            self._conn.send(Load(self._load, self._log_level))
            ready: LoadReply = self._recv()
        except RunnerLost as exc:
            self._kill()
            raise ModelLoadError(str(exc)) from exc
        if isinstance(ready, LoadFailed):
            self._kill()
            raise ModelLoadError(ready.reason)
        assert isinstance(ready, Ready), ready
        self._context_window = ready.context_window

    @property
    def context_window(self) -> int:
        return self._context_window

    @property
    def pid(self) -> int:
        return self._proc.pid

    def step(self, batch: StepBatch) -> dict[int, int]:
        try:
            self._conn.send(batch)
        except OSError as exc:
            raise self._lost() from exc
        reply: StepReply = self._recv()
        if isinstance(reply, StepFailed):
            raise StepError(reply.reason)
        assert isinstance(reply, StepDone), reply
        return reply.tokens

    # -- Restartable ----------------------------------------------------------------------
    def check_alive(self) -> None:
        if self._proc.poll() is not None:
            raise self._lost()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self._proc.kill()

    def restart(self) -> None:
        self._kill()
        self._start()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.send(Close())
        try:
            self._proc.wait(30)
        except subprocess.TimeoutExpired:
            log.warning("the model process did not exit in 30 s; killing it")
        self._kill()

    def _recv(self) -> Any:
        try:
            return self._conn.recv()
        except (EOFError, OSError) as exc:
            raise self._lost() from exc

    def _lost(self) -> RunnerLost:
        try:
            code = self._proc.wait(5)
        except subprocess.TimeoutExpired:
            return RunnerLost("The model process closed its connection.")
        return RunnerLost(f"The model process exited ({exit_reason(code)}).")

    def _kill(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._conn.close()
        atexit.unregister(self._kill)


def exit_reason(code: int) -> str:
    """`exit code 1`, or `killed by SIGKILL` for a process a signal ended (Popen's -9)."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"

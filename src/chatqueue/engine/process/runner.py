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
import collections
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from typing import Any

from chatqueue.engine.process.messages import (
    Close,
    Load,
    LoadFailed,
    LoadReply,
    Preload,
    Ready,
    StepDone,
    StepFailed,
    StepReply,
)
from chatqueue.engine.runner import KVSpec, ModelRunner, RunnerLost, StepBatch, StepOutput
from chatqueue.text.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# a step message past this size is sent only once the step before it has been read back
LARGE_MESSAGE_BYTES = 64 * 1024


class ModelLoadError(RuntimeError):
    """Loading the model failed in the child; the message is the child's error."""


class StepError(RuntimeError):
    """A step raised in the child; the runner is still usable (as when it raises in-process)."""


class ModelProcess:
    """One model process and our end of its socket. Started with `preload` imported (the heavy
    modules) and prepared, it then waits for its `Load`. Start one early (before the server's
    own slow work, such as loading the tokenizer) and hand it to `ProcessRunner`."""

    def __init__(self, preload: Preload) -> None:
        ours, theirs = socket.socketpair()
        with ours, theirs:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "chatqueue.engine.process.child", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                # the server's import path: chatqueue, and the module `load` comes from, import
                # there as they did here (a source checkout, a benchmark's folder)
                env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
            )
            self.conn = Connection(ours.detach())
        atexit.register(self.kill)  # an engine thread stuck past exit must not orphan it
        self._asked = False
        with contextlib.suppress(OSError):  # a child dead at once shows when it is loaded
            self.conn.send(preload)

    def ask(self, load: Load) -> None:
        """Send its `Load` (once: later calls do nothing). The child reads it when its imports
        and preparation are done, so asking early costs nothing and waits for nothing."""
        if not self._asked:
            self._asked = True
            self.conn.send(load)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.conn.close()
        atexit.unregister(self.kill)


class ProcessRunner:
    """A Runner whose model lives in a child process. The child calls `load()` (a picklable
    callable: a module-level function or a functools.partial of one) and serves steps.

    With a `preload` (module names, e.g. torch; what runs beside them and after them), a spare
    child is kept with those modules imported, so that a restart after a death only loads the
    weights: importing torch and transformers is most of a small model's start. Its `prepare`
    (picklable too) then runs in every child before its `Load`: in a spare, ahead of need (the
    GPU's context, the compiler's imports).

    Blocks until the model is loaded; raises ModelLoadError if it fails. Every method runs on the
    engine thread but `kill`, which any thread may call."""

    def __init__(
        self,
        load: Callable[[], ModelRunner],
        *,
        tokenizer: Tokenizer,
        model_name: str,
        log_level: str = "info",
        preload: Preload | None = None,
        started: ModelProcess | None = None,
    ) -> None:
        """`started`: a model process started earlier with the same `preload`,
        to load into (its imports overlapped whatever the caller did meanwhile), and asked for
        the same `load` if it was asked at all."""
        self.tokenizer = tokenizer
        self.model_name = model_name
        self._load = load
        self._log_level = log_level
        self._preload = preload
        self._spare: ModelProcess | None = started
        self.info: dict[str, Any] = {}  # the loaded runner's choices, from its Ready
        self._start()

    def _start(self) -> None:
        self._num_unread = 0  # steps sent whose replies `recv_step` has not returned
        self._read_ahead: collections.deque[StepReply] = collections.deque()
        self._child, self._spare = self._spare or ModelProcess(self._preload or Preload()), None
        try:
            self._child.ask(Load(self._load, self._log_level))
            ready: LoadReply = self._recv()
        except (RunnerLost, OSError) as exc:
            self._child.kill()
            raise ModelLoadError(str(exc)) from exc
        if isinstance(ready, LoadFailed):
            self._child.kill()
            raise ModelLoadError(ready.reason)
        assert isinstance(ready, Ready), ready
        self._context_window = ready.context_window
        self.info = ready.info
        self._kv_spec = ready.kv_spec
        if self._preload:
            self._spare = ModelProcess(self._preload)

    @property
    def context_window(self) -> int:
        return self._context_window

    @property
    def kv_spec(self) -> KVSpec | None:
        return self._kv_spec

    @property
    def pid(self) -> int:
        return self._child.proc.pid

    @property
    def spare_pid(self) -> int | None:
        return None if self._spare is None else self._spare.proc.pid

    def step(self, batch: StepBatch) -> StepOutput:
        self.send_step(batch)
        return self.recv_step()

    # -- Pipelined --------------------------------------------------------------------------
    def send_step(self, batch: StepBatch) -> None:
        message = ForkingPickler.dumps(batch)
        if self._num_unread and len(message) > LARGE_MESSAGE_BYTES:
            # NOTE: while the child still runs the step before, it reads nothing: a message
            # larger than the socket's buffer would block this send until it does, and its own
            # reply, if larger than the buffer the other way, would block it too. Its reply is
            # read first, then.
            self._read_ahead.append(self._recv())
        try:
            self._child.conn.send_bytes(message)
        except OSError as exc:
            raise self._lost() from exc
        self._num_unread += 1

    def recv_step(self) -> StepOutput:
        assert self._num_unread, "recv_step without a step sent"
        reply: StepReply = self._read_ahead.popleft() if self._read_ahead else self._recv()
        self._num_unread -= 1
        if isinstance(reply, StepFailed):
            raise StepError(reply.reason)
        assert isinstance(reply, StepDone), reply
        return reply.output

    # -- Restartable ----------------------------------------------------------------------
    def check_alive(self) -> None:
        if self._child.proc.poll() is not None:
            raise self._lost()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self._child.proc.kill()

    def restart(self) -> None:
        self._child.kill()
        self._start()

    def close(self) -> None:
        if self._spare is not None:
            self._spare.kill()
        with contextlib.suppress(OSError):
            self._child.conn.send(Close())
        try:
            self._child.proc.wait(30)
        except subprocess.TimeoutExpired:
            log.warning("the model process did not exit in 30 s; killing it")
        self._child.kill()

    def _recv(self) -> Any:
        try:
            return self._child.conn.recv()
        except (EOFError, OSError) as exc:
            raise self._lost() from exc

    def _lost(self) -> RunnerLost:
        try:
            code = self._child.proc.wait(5)
        except subprocess.TimeoutExpired:
            return RunnerLost("The model process closed its connection.")
        return RunnerLost(f"The model process exited ({exit_reason(code)}).")


def exit_reason(code: int) -> str:
    """`exit code 1`, or `killed by SIGKILL` for a process a signal ended (Popen's -9)."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"

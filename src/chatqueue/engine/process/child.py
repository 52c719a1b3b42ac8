"""The model process: `python -m chatqueue.engine.process.child FD`, started by ProcessRunner.

It imports what the server names (`Preload`: a spare child does this ahead of need), loads the
model by calling what the server sent (`Load`), answers `Ready`, then takes one
StepBatch at a time and answers `StepDone` or `StepFailed`; it exits on `Close` or when the
socket closes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

from chatqueue.engine.process.messages import (
    Close,
    Load,
    LoadFailed,
    Preload,
    Ready,
    StepDone,
    StepFailed,
    StepReply,
)
from chatqueue.engine.runner import ModelRunner, PagedKV, StepBatch, runner_info

log = logging.getLogger(__name__)


def serve(conn: Connection) -> None:
    # Ctrl-C reaches the whole process group, and a service manager may signal every process of
    # the service: the server drains its requests, then closes us (or its end of the socket does).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    began = time.perf_counter()
    preload: Preload = conn.recv()
    beside = _start_beside(preload.beside)
    for module in preload.modules:
        importlib.import_module(module)
    if beside is not None:
        beside.join()
    imported = time.perf_counter()
    if preload.prepare is not None:
        # a failure here is met again by the load, which reports it to the server
        with contextlib.suppress(Exception):
            preload.prepare()
    prepared = time.perf_counter()
    try:
        load: Load = conn.recv()
    except EOFError:  # a spare never used: the server closed it
        return
    logging.basicConfig(
        level=load.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asked = time.perf_counter()
    try:
        runner: ModelRunner = load.load()
    except BaseException as exc:
        log.exception("loading the model failed")
        conn.send(LoadFailed(str(exc) or type(exc).__name__))
        return
    # NOTE: where a start's time goes (a spare's imports and preparation ran before it was asked)
    log.info(
        "model process: imports %.1f s, prepared %.1f s, waited %.1f s for its load, loaded %.1f s",
        imported - began,
        prepared - imported,
        asked - prepared,
        time.perf_counter() - asked,
    )
    kv_spec = runner.kv_spec if isinstance(runner, PagedKV) else None
    conn.send(Ready(runner.context_window, runner_info(runner), kv_spec))
    gc.collect()
    gc.freeze()  # what loading left is never walked again (see Engine._run)
    try:
        while True:
            try:
                message: StepBatch | Close = conn.recv()
            except EOFError:  # the server is gone
                break
            if isinstance(message, Close):
                break
            began = time.perf_counter()
            try:
                output = runner.step(message)
                busy = time.perf_counter() - began
                reply: StepReply = StepDone(dataclasses.replace(output, busy_s=busy))
            except Exception as exc:
                log.exception("a step failed")
                reply = StepFailed(f"{type(exc).__name__}: {exc}")
            conn.send(reply)
    finally:
        runner.close()


def _start_beside(work: Callable[[], None] | None) -> threading.Thread | None:
    if work is None:
        return None

    def run() -> None:
        # a failure here is met again by `prepare` or the load, which report it
        with contextlib.suppress(Exception):
            work()

    thread = threading.Thread(target=run, name="preload-beside", daemon=True)
    thread.start()
    return thread


if __name__ == "__main__":
    serve(Connection(int(sys.argv[1])))

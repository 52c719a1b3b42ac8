"""The model process: `python -m chatqueue.engine.process_child FD`, started by ProcessRunner.

It loads the model by calling what the server sent, answers `Ready`, then takes one StepBatch at
a time and answers ("ok", tokens) or ("error", why); it exits on CLOSE or when the socket closes.
"""

from __future__ import annotations

import gc
import logging
import signal
import sys
from multiprocessing.connection import Connection

from chatqueue.engine.process_runner import CLOSE, Ready
from chatqueue.engine.runner import Runner

log = logging.getLogger(__name__)


def serve(conn: Connection) -> None:
    # Ctrl-C reaches the whole process group, and a service manager may signal every process of
    # the service: the server drains its requests, then closes us (or its end of the socket does).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    load, log_level = conn.recv()
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        runner: Runner = load()
    except BaseException as exc:
        log.exception("loading the model failed")
        conn.send(("failed", str(exc) or type(exc).__name__))
        return
    try:  # pickled whole before a byte is written: on failure the socket is still clean
        conn.send(("ready", Ready(runner.model_name, runner.context_window, runner.tokenizer)))
    except Exception as exc:
        conn.send(("failed", f"the tokenizer cannot be sent to the server process: {exc}"))
        runner.close()
        return
    gc.collect()
    gc.freeze()  # what loading left is never walked again (see Engine._run)
    try:
        while True:
            try:
                batch = conn.recv()
            except EOFError:  # the server is gone
                break
            if batch is CLOSE:
                break
            try:
                reply: tuple[str, object] = ("ok", runner.step(batch))
            except Exception as exc:
                log.exception("a step failed")
                reply = ("error", f"{type(exc).__name__}: {exc}")
            conn.send(reply)
    finally:
        runner.close()


if __name__ == "__main__":
    serve(Connection(int(sys.argv[1])))

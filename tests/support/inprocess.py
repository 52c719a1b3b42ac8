"""The real HTTP stack (uvicorn on a free port) around an app built in the test, so a test can hand
the server a runner of its own (one that fails or hangs on cue) without any test-only flag."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import uvicorn

from chatqueue import ChatQueue
from chatqueue.config import Settings
from chatqueue.engine.mock import MockConfig, MockRunner
from chatqueue.engine.runner import Runner, StepBatch, StepOutput
from chatqueue.server.app import create_app
from tests.support.http import SAFETY_S
from tests.support.servers import free_port


@contextmanager
def serving(
    runner: Runner | Callable[[], Runner],
    *,
    tmp_path: Path,
    settings: dict[str, Any] | None = None,
    **queue: Any,
) -> Iterator[str]:
    """uvicorn in a background thread, serving `create_app` over `ChatQueue(runner, **queue)`;
    yields the base URL."""
    config = Settings(
        engine="mock", history="memory", data_dir=tmp_path, shutdown_timeout=1, **(settings or {})
    )
    app = create_app(config, chat_queue=ChatQueue(runner, **queue))
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + SAFETY_S
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(SAFETY_S * 3)


def prompt_of(runner: MockRunner, prompt_ids: Any) -> str:
    return runner.tokenizer.decode(prompt_ids)


class GatedRunner(MockRunner):
    """Takes no step until `gate` is set: what is admitted stays put while the test looks."""

    def __init__(self, config: MockConfig) -> None:
        super().__init__(config)
        self.gate = threading.Event()

    def step(self, batch: StepBatch) -> StepOutput:
        self.gate.wait(SAFETY_S * 3)
        return super().step(batch)


class FailingRunner(MockRunner):
    """Raises in the step that prefills a prompt containing "boom"."""

    def step(self, batch: StepBatch) -> StepOutput:
        if any("boom" in prompt_of(self, n.prompt_ids) for n in batch.new):
            super().step(StepBatch(new=[], running=[], released=batch.released))
            raise RuntimeError("injected fault")
        return super().step(batch)


class HangingRunner(MockRunner):
    """Hangs in the step that prefills a prompt containing "hang", until `release` is set."""

    def __init__(self, config: MockConfig) -> None:
        super().__init__(config)
        self.release = threading.Event()

    def step(self, batch: StepBatch) -> StepOutput:
        if any("hang" in prompt_of(self, n.prompt_ids) for n in batch.new):
            self.release.wait(SAFETY_S * 3)
        return super().step(batch)

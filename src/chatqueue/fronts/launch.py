"""`chatqueue serve --api-servers N`: this process is the core (the ChatQueue, its engine thread,
the model process); N API server processes share the listening socket and serve HTTP over it.

NOTE: why. One process caps near 40k tokens/s of SSE on a CPU core: every stream's write a step
holds the GIL (~19 us each on loopback), beside the engine's own work, so at 256 streams the
event loop, not the model, set the pace (benchmarks/RESULTS.md, issue 14). Here the writes are
spread over N processes, and the core's loop carries one frame a step for each.

An API server that dies is started again (its requests are aborted by the core, their slots
freed); one that keeps dying within `RESTART_WINDOW_S` stops the server. SIGTERM drains the API
servers (each lets its streams finish for up to --shutdown-timeout), then the core stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess

from fastapi import FastAPI

from chatqueue.api import ChatQueue
from chatqueue.api.build import chat_queue_for
from chatqueue.config import Settings
from chatqueue.fronts.client import CoreClient, CoreLimiter
from chatqueue.fronts.core import Core
from chatqueue.server import serve as server
from chatqueue.server.auth import Keyring
from chatqueue.server.chat_session import session_secret

log = logging.getLogger(__name__)

MAX_RESTARTS = 5  # of API servers within the window, then the whole server stops
RESTART_WINDOW_S = 60.0
STOP_MARGIN_S = 5.0  # past --shutdown-timeout, before an API server that still runs is killed


def serve_api_servers(
    settings: Settings,
    *,
    chat_queue: ChatQueue | None = None,
    on_app: Callable[[FastAPI], None] | None = None,
) -> None:
    """`chat_queue`: one made elsewhere (over a model process started ahead, a benchmark's);
    else one from the settings. `on_app`: called in each API server with its app (module-level:
    it travels to the API servers by name). Raises KeyFileError (before anything starts) when
    the --api-keys file is bad."""
    sys.setswitchinterval(0.0005)  # as one server (server/serve.py): the engine thread's GIL
    server.tune_gc(settings.gc_threshold)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    Keyring.from_settings(settings)  # a bad key file stops us here, not in N processes
    # NOTE: one secret for every API server's session cookies (a browser's next request may
    # reach another process); made here once, so that N processes do not each make their own.
    settings = settings.model_copy(update={"session_secret": session_secret(settings)})
    listener = socket.create_server(
        (settings.host, settings.port),
        family=socket.AF_INET6 if ":" in settings.host else socket.AF_INET,
        backlog=2048,
    )
    try:
        cq = chat_queue or chat_queue_for(settings)
        asyncio.run(_serve(settings, listener, cq, on_app))
    finally:
        listener.close()


async def _serve(
    settings: Settings,
    listener: socket.socket,
    cq: ChatQueue,
    on_app: Callable[[FastAPI], None] | None,
) -> None:
    await cq.start_queue_worker()
    folder = tempfile.mkdtemp(prefix="chatqueue-core-")  # 0700: only this user may connect
    path = os.path.join(folder, "core.sock")
    core = Core(cq)
    unix_server = await core.serve(path)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    host, port = listener.getsockname()[:2]
    log.info("the core serves %d API servers on http://%s:%d", settings.api_servers, host, port)
    fronts = _Fronts(settings, listener, path, on_app)
    try:
        await fronts.supervise(stopping)
    finally:
        await fronts.stop(settings.shutdown_timeout + STOP_MARGIN_S)
        unix_server.close()
        await core.close()
        await cq.stop(0)
        shutil.rmtree(folder, ignore_errors=True)


class _Fronts:
    """The API server processes: started, started again when one dies, stopped."""

    def __init__(
        self,
        settings: Settings,
        listener: socket.socket,
        path: str,
        on_app: Callable[[FastAPI], None] | None,
    ) -> None:
        self._settings = settings
        self._listener = listener
        self._path = path
        self._on_app = on_app
        self._context = multiprocessing.get_context("spawn")
        self._processes: dict[int, BaseProcess] = {}
        self._deaths: list[float] = []

    def _start(self, index: int) -> None:
        process = self._context.Process(
            target=run_api_server,
            args=(self._settings, self._listener, self._path, index, self._on_app),
            name=f"chatqueue-api-{index}",
            daemon=False,
        )
        process.start()
        self._processes[index] = process

    async def supervise(self, stopping: asyncio.Event) -> None:
        """Until `stopping` is set, or API servers die too often."""
        for index in range(self._settings.api_servers):
            self._start(index)
        loop = asyncio.get_running_loop()
        while not stopping.is_set():
            died = asyncio.Event()
            for process in self._processes.values():
                loop.add_reader(process.sentinel, died.set)
            try:
                waits = [asyncio.ensure_future(e.wait()) for e in (stopping, died)]
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                for wait in waits:
                    wait.cancel()
            finally:
                for process in self._processes.values():
                    loop.remove_reader(process.sentinel)
            if stopping.is_set():
                return
            for index, process in list(self._processes.items()):
                if not process.is_alive():
                    self._restart(index, process)

    def _restart(self, index: int, process: BaseProcess) -> None:
        now = time.monotonic()
        self._deaths = [t for t in self._deaths if t > now - RESTART_WINDOW_S] + [now]
        if len(self._deaths) > MAX_RESTARTS:
            raise RuntimeError(
                f"API servers died {len(self._deaths)} times within {RESTART_WINDOW_S:.0f} s; "
                "stopping"
            )
        log.error("API server %d exited (%s); starting it again", index, process.exitcode)
        self._start(index)

    async def stop(self, timeout_s: float) -> None:
        """SIGTERM: each drains and exits; any still running after `timeout_s` is killed."""
        for process in self._processes.values():
            if process.is_alive() and process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for process in self._processes.values():
            await asyncio.to_thread(process.join, max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.warning("API server %s did not stop in time: killed", process.name)
                process.kill()
                await asyncio.to_thread(process.join, 5.0)


def run_api_server(
    settings: Settings,
    listener: socket.socket,
    path: str,
    index: int,
    on_app: Callable[[FastAPI], None] | None = None,
) -> None:
    """One API server process: the app over the core at `path`, on the shared `listener`."""
    client = CoreClient(
        path,
        name=str(index),
        max_unread_tokens=settings.max_unread_tokens,
        max_prompt_tokens=settings.max_prompt_tokens,
        max_tokens_cap=settings.max_tokens_cap,
        tool_call_format=settings.tool_call_format,
    )
    server.serve(
        settings,
        chat_queue=client,
        rate_limiter=CoreLimiter(client),
        sockets=[listener],
        on_app=on_app,
    )

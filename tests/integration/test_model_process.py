"""The model in its own process (`--model-process on`, the default for the hf engine): the same
replies as in-process, a step's error kept to its requests, a dead or hung model process restarted
with the waiting requests keeping their places (or, with restarts off or spent, failing what is in
flight with /health saying why), and no model process left behind by a server killed outright.

Runners here are the mock's (a real child process, real sockets); the real model goes through the
same path in test_model_server.py.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractContextManager, asynccontextmanager
from pathlib import Path

import httpx
import pytest

from chatqueue.engine.mock import LOREM, MockConfig, MockRunner, MockTokenizer
from chatqueue.engine.process import Preload
from chatqueue.engine.process.runner import ModelLoadError, ProcessRunner
from chatqueue.engine.runner import (
    ModelRunner,
    NewSequence,
    Runner,
    RunnerLost,
    StepBatch,
    StepOutput,
)
from chatqueue.types import ChatMessage, SamplingParams
from tests.support.http import (
    COMPLETIONS,
    SAFETY_S,
    OpenStream,
    has_content,
    load,
    metric,
    metrics,
    until,
    wait_load,
)
from tests.support.inprocess import serving
from tests.support.outcomes import send, user_says
from tests.support.servers import model_process_pids

LONG = " ".join(["w"] * 2000)  # echoed a word a step: outlasts the test, which ends it


def in_a_process(runner_class: type[MockRunner], **config: object) -> functools.partial[Runner]:
    load = functools.partial(runner_class, MockConfig(**config))  # type: ignore[arg-type]
    return functools.partial(process_runner, load)


def process_runner(load: Callable[[], ModelRunner]) -> ProcessRunner:
    """The mock model in its own process; the server keeps its own mock tokenizer."""
    return ProcessRunner(load, tokenizer=MockTokenizer(), model_name="mock")


def model_processes() -> list[int]:
    """Pids of this test process's children that are model processes."""
    return model_process_pids("self")


@asynccontextmanager
async def ready_client(url: str) -> AsyncIterator[httpx.AsyncClient]:
    """A client, once /health says the model (in its process) is loaded."""
    # NOTE: a request here may wait through restarts, each a new process's imports: seconds
    # apiece on a busy machine. The timeout is a net against hangs, so it allows for that.
    async with httpx.AsyncClient(base_url=url, timeout=6 * SAFETY_S) as client:
        await until(lambda: is_healthy(client), "the model process never became ready")
        yield client


async def is_healthy(client: httpx.AsyncClient) -> bool:
    return (await client.get("/health")).status_code == 200


@pytest.mark.parametrize("mode", ["echo", "lorem"])
async def test_replies_through_the_model_process_are_the_in_process_replies(
    mode: str, tmp_path: Path
) -> None:
    factory = in_a_process(MockRunner, mode=mode, delay_s=0.002, lorem_tokens=12)
    texts = [f"message number {i} from me" for i in range(8)]
    with serving(factory, tmp_path=tmp_path, max_concurrent=3, max_queue_size=8) as url:
        async with ready_client(url) as client:
            outs = await asyncio.gather(
                *(send(client, user_says(t, stream=i % 2 == 0)) for i, t in enumerate(texts))
            )
            idle = await wait_load(client, processing=0, waiting=0)
    expected = texts if mode == "echo" else [" ".join(LOREM[:12])] * len(texts)
    assert [o.status for o in outs] == [200] * len(texts)
    assert [o.text for o in outs] == expected
    assert idle["state"] == "ready"


class FailsOnLongPrompts(MockRunner):
    """Raises in the step that prefills a prompt of over 8 tokens. (The child's copy of the mock
    tokenizer never sees the server's words, so it goes by length, not by text.)"""

    def step(self, batch: StepBatch) -> StepOutput:
        if any(len(n.prompt_ids) > 8 for n in batch.new):
            super().step(StepBatch(new=[], running=[], released=batch.released))
            raise RuntimeError("injected fault")
        return super().step(batch)


async def test_a_failing_step_in_the_model_process_fails_only_its_requests(
    tmp_path: Path,
) -> None:
    factory = in_a_process(FailsOnLongPrompts, mode="echo", delay_s=0.002)
    texts = ("one", "boom " * 8, "two")
    with serving(factory, tmp_path=tmp_path, max_concurrent=1, max_queue_size=8) as url:
        async with ready_client(url) as client:
            outs = await asyncio.gather(*(send(client, user_says(t, stream=True)) for t in texts))
            after = await send(client, user_says("after", stream=False))
            health = await client.get("/health")
    assert [o.text for o in outs] == ["one", "", "two"]
    assert outs[1].error and outs[1].error["type"] == "engine_error"
    assert "injected fault" in outs[1].error["message"]
    assert after.status == 200 and after.text == "after"
    assert health.status_code == 200


async def test_without_restarts_a_dead_model_process_fails_what_is_in_flight_and_health_says_why(
    tmp_path: Path,
) -> None:
    factory = in_a_process(MockRunner, mode="echo", delay_s=0.01)
    no_restarts = {"max_concurrent": 1, "max_queue_size": 8, "max_model_restarts": 0}
    with serving(factory, tmp_path=tmp_path, **no_restarts) as url:
        async with ready_client(url) as client:
            async with OpenStream(client, user_says(LONG, stream=True)) as running:
                await running.read_until(has_content)
                waiting = asyncio.create_task(send(client, user_says("w", stream=False)))
                await wait_load(client, processing=1, waiting=1)
                [pid] = model_processes()
                os.kill(pid, signal.SIGKILL)
                streamed = await running.read_to_end()
            queued = await waiting
            health = await client.get("/health")
            refused = await send(client, user_says("new", stream=True))
            figures = await wait_load(client, processing=0, waiting=0)
    assert streamed.status == 200 and streamed.events[-1].is_done
    [error] = [
        e.data["error"] for e in streamed.events if isinstance(e.data, dict) and "error" in e.data
    ]
    assert error["type"] == "engine_error" and "model process exited" in error["message"]
    assert queued.status == 503 and queued.error and queued.error["type"] == "service_unavailable"
    assert health.status_code == 503
    assert health.json()["status"] == "failed" and "model process exited" in health.json()["error"]
    assert refused.status == 503 and refused.error
    assert "model process exited" in refused.error["message"]
    assert figures["state"] == "failed"
    assert model_processes() == []


def load_that_fails() -> ModelRunner:
    raise ValueError("no model folder at /nowhere")


def test_a_load_that_fails_in_the_model_process_raises_its_message() -> None:
    with pytest.raises(ModelLoadError, match="no model folder at /nowhere"):
        process_runner(load_that_fails)
    assert model_processes() == []


def test_a_server_killed_outright_leaves_no_model_process(tmp_path: Path) -> None:
    script = (
        "import functools, sys, time\n"
        "from chatqueue.engine.mock import MockConfig, MockRunner\n"
        "from chatqueue.engine.mock import MockTokenizer\n"
        "from chatqueue.engine.process.runner import ProcessRunner\n"
        "load = functools.partial(MockRunner, MockConfig())\n"
        "runner = ProcessRunner(load, tokenizer=MockTokenizer(), model_name='mock')\n"
        "print(runner.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    server = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    child = int(server.stdout.readline())
    assert Path(f"/proc/{child}").exists()
    server.kill()
    server.wait()
    deadline = time.monotonic() + SAFETY_S
    while _is_running(child):
        assert time.monotonic() < deadline, "the model process outlived its server"
        time.sleep(0.02)


def _is_running(pid: int) -> bool:
    """Alive and not a zombie (it is not our child: init reaps it)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def test_signals_for_the_whole_group_leave_the_model_process_to_its_server() -> None:
    runner = process_runner(functools.partial(MockRunner, MockConfig(mode="echo")))
    prompt = runner.tokenizer.apply_chat_template([ChatMessage("user", "still here")])
    for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C, a service manager stopping the group
        os.kill(runner.pid, sig)
    first = runner.step(
        StepBatch(new=[NewSequence(1, prompt, SamplingParams())], running=[], released=[])
    ).tokens
    second = runner.step(StepBatch(new=[], running=[1], released=[])).tokens
    assert runner.tokenizer.decode([first[1], second[1]]) == "still here"
    runner.close()
    assert model_processes() == []


# -- healing: the model process comes back ------------------------------------------------


class LoadsWhileAllowed(MockRunner):
    """A mock model whose loading waits while `<folder>/hold` exists and fails while
    `<folder>/refuse` exists: the test decides how a restart goes."""

    def __init__(self, folder: str, config: MockConfig) -> None:
        while (Path(folder) / "hold").exists():
            time.sleep(0.01)
        if (Path(folder) / "refuse").exists():
            raise RuntimeError("the model folder is gone")
        super().__init__(config)


def healing_server(tmp_path: Path, **queue: object) -> AbstractContextManager[str]:
    config = MockConfig(mode="echo", delay_s=0.01)
    load = functools.partial(LoadsWhileAllowed, str(tmp_path), config)
    factory = functools.partial(process_runner, load)
    fields = {"max_concurrent": 1, "max_queue_size": 8, **queue}
    return serving(factory, tmp_path=tmp_path, **fields)


async def health_of(client: httpx.AsyncClient) -> httpx.Response:
    return await client.get("/health")


async def test_a_killed_model_process_comes_back_and_the_waiting_keep_their_places(
    tmp_path: Path,
) -> None:
    with healing_server(tmp_path) as url:
        async with ready_client(url) as client:
            [first_pid] = model_processes()
            async with OpenStream(client, user_says(LONG, stream=True)) as running:
                await running.read_until(has_content)
                waiting = [
                    asyncio.create_task(send(client, user_says(f"w{i}", stream=i == 1)))
                    for i in range(2)
                ]
                await wait_load(client, processing=1, waiting=2)
                (tmp_path / "hold").touch()  # the restart waits until the test has looked
                os.kill(first_pid, signal.SIGKILL)
                cut = await running.read_to_end()
                await until(
                    lambda: has_status(client, "restarting"), "/health never said restarting"
                )
                during = await health_of(client)
                refused = await send(client, user_says("new", stream=False))
                still = await load(client)
                (tmp_path / "hold").unlink()
            replies = await asyncio.gather(*waiting)
            after = await health_of(client)
            figures = await metrics(client)
            fresh = await send(client, user_says("fresh", stream=True))
            [second_pid] = model_processes()
    [error] = [
        e.data["error"] for e in cut.events if isinstance(e.data, dict) and "error" in e.data
    ]
    assert error["type"] == "engine_restarted" and "killed by SIGKILL" in error["message"]
    assert cut.events[-1].is_done
    assert during.status_code == 503 and during.json()["status"] == "restarting"
    assert int(during.headers["Retry-After"]) >= 1
    assert during.json()["last_model_exit"] == "exited (killed by SIGKILL)"
    assert refused.status == 503 and refused.error
    assert "restarted" in refused.error["message"]
    assert (still["waiting"], still["state"]) == (2, "restarting")  # the queue kept its places
    assert [(r.status, r.text) for r in replies] == [(200, "w0"), (200, "w1")]
    assert after.status_code == 200 and after.json()["last_model_exit"]
    assert metric(figures, "chatqueue_model_restarts_total") == 1
    assert metric(figures, "chatqueue_model_exits_total", reason="exited (killed by SIGKILL)") == 1
    assert (fresh.status, fresh.text) == (200, "fresh")
    assert second_pid != first_pid


async def has_status(client: httpx.AsyncClient, status: str) -> bool:
    return bool((await health_of(client)).json()["status"] == status)


async def test_a_model_process_that_dies_while_idle_is_restarted_before_anyone_asks(
    tmp_path: Path,
) -> None:
    with healing_server(tmp_path) as url:
        async with ready_client(url) as client:
            [first_pid] = model_processes()
            os.kill(first_pid, signal.SIGKILL)
            await until(lambda: came_back(client), "the model process did not come back")
            reply = await send(client, user_says("hello again", stream=False))
    assert (reply.status, reply.text) == (200, "hello again")


async def came_back(client: httpx.AsyncClient) -> bool:
    health = await health_of(client)
    return health.status_code == 200 and "last_model_exit" in health.json()


async def test_a_hung_model_process_is_killed_and_restarted(tmp_path: Path) -> None:
    with healing_server(tmp_path, step_timeout_s=0.5) as url:
        async with ready_client(url) as client:
            [first_pid] = model_processes()
            async with OpenStream(client, user_says(LONG, stream=True)) as running:
                await running.read_until(has_content)
                waiting = asyncio.create_task(send(client, user_says("after", stream=False)))
                await wait_load(client, processing=1, waiting=1)
                os.kill(first_pid, signal.SIGSTOP)  # hangs: alive, answering nothing
                cut = await running.read_to_end()
            reply = await waiting
            health = await health_of(client)
    [error] = [
        e.data["error"] for e in cut.events if isinstance(e.data, dict) and "error" in e.data
    ]
    assert error["type"] == "engine_restarted"
    assert (reply.status, reply.text) == (200, "after")
    assert health.status_code == 200 and "SIGKILL" in health.json()["last_model_exit"]
    assert first_pid not in model_processes()


async def test_a_model_that_cannot_be_loaded_again_leaves_the_server_failed(
    tmp_path: Path,
) -> None:
    with healing_server(tmp_path, max_model_restarts=2) as url:
        async with ready_client(url) as client:
            [pid] = model_processes()
            (tmp_path / "refuse").touch()
            async with OpenStream(client, user_says(LONG, stream=True)) as running:
                await running.read_until(has_content)
                waiting = asyncio.create_task(send(client, user_says("w", stream=False)))
                await wait_load(client, processing=1, waiting=1)
                os.kill(pid, signal.SIGKILL)
                await running.read_to_end()
            queued = await waiting
            await until(lambda: has_status(client, "failed"), "/health never said failed")
            figures = await metrics(client)
    assert queued.status == 503
    assert metric(figures, "chatqueue_model_restarts_total") == 2  # then no more
    assert model_processes() == []


def test_a_restart_takes_the_spare_process_whose_imports_are_done() -> None:
    load = functools.partial(MockRunner, MockConfig(mode="echo"))
    runner = ProcessRunner(
        load, tokenizer=MockTokenizer(), model_name="mock", preload=Preload(("json",))
    )
    first, spare = runner.pid, runner.spare_pid
    assert spare is not None and spare != first
    os.kill(first, signal.SIGKILL)
    with pytest.raises(RunnerLost):
        runner.step(StepBatch(new=[], running=[], released=[]))
    runner.restart()
    assert runner.pid == spare  # the spare became the model process
    assert runner.spare_pid not in (None, first, spare)  # and a new spare waits
    prompt = runner.tokenizer.apply_chat_template([ChatMessage("user", "again")])
    first_token = runner.step(
        StepBatch(new=[NewSequence(1, prompt, SamplingParams())], running=[], released=[])
    ).tokens
    assert runner.tokenizer.decode([first_token[1]]) == "again"
    runner.close()
    assert model_processes() == []


def test_a_step_says_how_long_the_model_took_for_it_in_its_process() -> None:
    """What the model reports (`busy_s`) is its own share of the round trip: the rest is the
    hand-over between the processes, which `--overlap-steps auto` weighs."""
    load = functools.partial(MockRunner, MockConfig(mode="echo", delay_s=0.05))
    runner = ProcessRunner(load, tokenizer=MockTokenizer(), model_name="mock")
    prompt = runner.tokenizer.apply_chat_template([ChatMessage("user", "hello there")])
    began = time.perf_counter()
    output = runner.step(
        StepBatch(new=[NewSequence(1, prompt, SamplingParams())], running=[], released=[])
    )
    round_trip = time.perf_counter() - began
    runner.close()
    assert output.busy_s is not None
    assert 0.05 <= output.busy_s < round_trip  # the mock sleeps 0.05 s a step, in its process


def note_prepared(folder: str) -> None:
    """A `prepare` for the model process: leaves its pid in `folder`."""
    Path(folder, str(os.getpid())).touch()


def prepare_that_fails() -> None:
    raise RuntimeError("no GPU here")


def test_the_spare_is_prepared_before_it_is_needed(tmp_path: Path) -> None:
    load = functools.partial(MockRunner, MockConfig(mode="echo"))
    prepare = functools.partial(note_prepared, str(tmp_path))
    runner = ProcessRunner(
        load, tokenizer=MockTokenizer(), model_name="mock", preload=Preload(("json",), prepare)
    )
    assert runner.spare_pid is not None
    prepared = {runner.pid, runner.spare_pid}
    until_s = time.monotonic() + SAFETY_S
    while {int(p.name) for p in tmp_path.iterdir()} != prepared:  # the spare's runs on its own
        assert time.monotonic() < until_s, "the spare was never prepared"
        time.sleep(0.01)
    runner.close()
    assert model_processes() == []


def note_beside(folder: str) -> None:
    """What runs beside the imports: leaves `<pid>.beside` in `folder`, from its own thread."""
    assert threading.current_thread() is not threading.main_thread()
    Path(folder, f"{os.getpid()}.beside").touch()


def note_prepared_after_beside(folder: str) -> None:
    """A `prepare` that leaves `<pid>.prepared` only where `<pid>.beside` is there already."""
    if Path(folder, f"{os.getpid()}.beside").exists():
        Path(folder, f"{os.getpid()}.prepared").touch()


def test_what_runs_beside_the_imports_is_done_before_prepare(tmp_path: Path) -> None:
    load = functools.partial(MockRunner, MockConfig(mode="echo"))
    runner = ProcessRunner(
        load,
        tokenizer=MockTokenizer(),
        model_name="mock",
        preload=Preload(
            ("json",),
            prepare=functools.partial(note_prepared_after_beside, str(tmp_path)),
            beside=functools.partial(note_beside, str(tmp_path)),
        ),
    )
    assert (tmp_path / f"{runner.pid}.beside").exists()
    assert (tmp_path / f"{runner.pid}.prepared").exists()  # prepare ran after, in the same process
    runner.close()
    assert model_processes() == []


def test_a_prepare_that_fails_leaves_the_load_to_say_what_is_wrong() -> None:
    load = functools.partial(MockRunner, MockConfig(mode="echo"))
    runner = ProcessRunner(
        load,
        tokenizer=MockTokenizer(),
        model_name="mock",
        preload=Preload(prepare=prepare_that_fails, beside=prepare_that_fails),
    )
    prompt = runner.tokenizer.apply_chat_template([ChatMessage("user", "hi")])
    first = runner.step(
        StepBatch(new=[NewSequence(1, prompt, SamplingParams())], running=[], released=[])
    ).tokens
    assert runner.tokenizer.decode([first[1]]) == "hi"
    runner.close()
    with pytest.raises(ModelLoadError, match="no model folder at /nowhere"):
        ProcessRunner(
            load_that_fails,
            tokenizer=MockTokenizer(),
            model_name="mock",
            preload=Preload(prepare=prepare_that_fails),
        )
    assert model_processes() == []


async def test_a_restarted_model_process_starts_with_an_empty_kv_pool(tmp_path: Path) -> None:
    """The pool's size crosses from the model process; after a restart the prefix cache is
    empty (its KV died with the old process), so nothing is reported as reused."""
    factory = in_a_process(MockRunner, mode="echo", delay_s=0.002, kv_blocks=32, kv_block_size=4)
    body = user_says(" ".join(f"w{i}" for i in range(12)), stream=False)

    async def cached(client: httpx.AsyncClient) -> int:
        reply = (await client.post(COMPLETIONS, json=body)).json()
        return int(reply["usage"]["prompt_tokens_details"]["cached_tokens"])

    with serving(factory, tmp_path=tmp_path, max_concurrent=2, max_queue_size=4) as url:
        async with ready_client(url) as client:
            assert (await load(client))["kv_blocks_total"] == 32
            assert [await cached(client), await cached(client)] == [0, 12]
            [first_pid] = model_processes()
            os.kill(first_pid, signal.SIGKILL)
            await until(lambda: came_back(client), "the model process did not come back")
            after = await cached(client)
            assert (await load(client))["kv_blocks_total"] == 32
    assert after == 0

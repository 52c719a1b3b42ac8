"""The engine loop: one thread that schedules, runs the model a step at a time, and hands events
to the event loop. The asyncio side never waits on the model; it only takes a short lock to admit
or abort."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import gc
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from chatqueue.engine.runner import NewSequence, Runner, RunnerLost, StepBatch
from chatqueue.engine.sequence import Sequence, Step
from chatqueue.engine.stream import RequestStream
from chatqueue.errors import (
    ChatQueueError,
    EngineError,
    QueueTimeout,
    ServiceUnavailable,
)
from chatqueue.metrics import Metrics
from chatqueue.scheduler import Request, SchedulePlan, Scheduler
from chatqueue.types import Event, Finished, FinishReason, Queued, Started, Token, Usage

log = logging.getLogger(__name__)

Outbox = list[tuple["Job", Event]]
_DELIVERY_SLICE = 32  # events handed to streams per event-loop iteration


@dataclass(eq=False)
class Job:
    """One request across the layers: the scheduler's record, its generation, the caller's end."""

    request: Request
    sequence: Sequence
    stream: RequestStream
    last_position: int | None = None
    first_token_at: float | None = None
    abort_error: ChatQueueError | None = None  # why the server cut it short; None: client left
    is_failed: bool = False  # told of an error while its step was still running (a hang)


class EngineState(enum.StrEnum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    STOPPED = "stopped"


class Engine:
    def __init__(
        self,
        *,
        scheduler: Scheduler,
        runner: Runner | Callable[[], Runner],
        metrics: Metrics,
        clock: Callable[[], float],
        on_finished: Callable[[Job, Finished], None] | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.metrics = metrics
        self._runner_source = runner
        self._clock = clock
        self._on_finished = on_finished
        self._cond = threading.Condition()
        self._jobs: dict[int, Job] = {}
        self._positions_dirty = False
        self._is_stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.runner: Runner | None = runner if isinstance(runner, Runner) else None
        self.state = EngineState.LOADING
        self.load_error: BaseException | None = None
        self.loaded = threading.Event()  # set once loading ended, well or not
        self._step_started: float | None = None
        self._step_jobs: list[Job] = []
        self.is_hung = False

    # -- asyncio side (short critical sections only) --------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self._thread is None, "engine already started"
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="chatqueue-engine", daemon=True)
        self._thread.start()

    def add(self, job: Job, now: float) -> None:
        with self._cond:
            if self.state is EngineState.FAILED:
                raise ServiceUnavailable(f"The model is not available: {self.load_error}")
            self.scheduler.add(job.request, now)  # raises QueueFull, ShuttingDown, ...
            self._jobs[job.request.rid] = job
            self._positions_dirty = True
            self.metrics.waiting.set(self.scheduler.num_waiting)
            self._cond.notify()

    def abort(self, job: Job) -> None:
        """Abort from the event loop. A waiting request is told at once; a running one at the
        next step, when its slot is free."""
        with self._cond:
            if job.request.rid not in self._jobs:
                return
            left_queue = self.scheduler.abort(job.request)
            if left_queue:
                del self._jobs[job.request.rid]
                self._positions_dirty = True
                self.metrics.waiting.set(self.scheduler.num_waiting)
            self._cond.notify()
        if left_queue:
            self._deliver([(job, self._finished(job, FinishReason.ABORT))])

    def close_admission(self) -> None:
        with self._cond:
            self.scheduler.close()

    def abort_everything(self, error: ChatQueueError) -> None:
        """Shutdown past its grace period: the queue is emptied, running requests end at the
        next step."""
        with self._cond:
            gone = self.scheduler.expire_all_waiting(FinishReason.ERROR)
            outbox: Outbox = []
            for req in gone:
                job = self._jobs.pop(req.rid)
                outbox.append((job, self._finished(job, FinishReason.ERROR, error)))
            for job in self._jobs.values():
                job.abort_error = error
                self.scheduler.abort(job.request)
            self._positions_dirty = True
            self._cond.notify()
        self._deliver(outbox)

    def wait_idle(self, timeout_s: float) -> bool:
        """Blocking: wait until nothing is running or waiting. True if that happened in time."""
        with self._cond:
            return self._cond.wait_for(lambda: not self.scheduler.has_work, timeout_s)

    def check_hung(self, now: float, step_timeout_s: float) -> bool:
        """From the watchdog: if the step in flight has run past `step_timeout_s`, fail every
        waiting and running request with 503 instead of leaving them hanging. True while hung."""
        with self._cond:
            started = self._step_started
            if self.is_hung or started is None or now - started <= step_timeout_s:
                return self.is_hung
            self.is_hung = True
            error = ServiceUnavailable(
                f"The model has not answered for {now - started:.0f} s; the request was failed."
            )
            outbox: Outbox = []
            for req in self.scheduler.expire_all_waiting(FinishReason.ERROR):
                job = self._jobs.pop(req.rid)
                outbox.append((job, self._finished(job, FinishReason.ERROR, error)))
            for job in self._step_jobs:
                job.is_failed = True
                outbox.append((job, self._finished(job, FinishReason.ERROR, error)))
        log.error("a step has run for %.1f s: failing the requests in flight", now - started)
        self._deliver(outbox)
        return True

    def stop(self, join_timeout_s: float | None = None) -> None:
        """Ends the thread once nothing is left to do (abort first to stop sooner). Blocking."""
        with self._cond:
            self._is_stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(join_timeout_s)

    # -- the engine thread ----------------------------------------------------------------
    def _run(self) -> None:
        runner = self._load()
        if runner is None:
            return
        # NOTE: loading (and compiling, on a GPU) leaves millions of long-lived objects; a full
        # collection walking them all paused every thread for over a second under load. Frozen,
        # they are never walked again (and handed back to the collector when the engine stops).
        gc.collect()
        gc.freeze()
        try:
            while self._step(runner):
                pass
        finally:
            runner.close()
            gc.unfreeze()
            if self.state is not EngineState.FAILED:
                self.state = EngineState.STOPPED

    def _load(self) -> Runner | None:
        try:
            if self.runner is None:
                assert callable(self._runner_source)
                self.runner = self._runner_source()  # type: ignore[call-arg]
            self.state = EngineState.READY
        except BaseException as exc:
            log.exception("loading the model failed")
            self.load_error = exc
            self.state = EngineState.FAILED
        finally:
            self.loaded.set()
        return self.runner if self.state is EngineState.READY else None

    def _step(self, runner: Runner) -> bool:
        """One step: schedule, run the model, hand out the results. False when it is time to stop."""
        with self._cond:
            while not (self.scheduler.has_work or self._positions_dirty or self._is_stopping):
                self._cond.wait(self._wait_timeout())
            if self._is_stopping and not self.scheduler.has_work:
                return False
            now = self._clock()
            plan = self.scheduler.schedule(now)
            outbox = self._plan_events(plan, now)
            if not self.scheduler.has_work:
                self._cond.notify_all()  # wake `wait_idle`
        self._hand_over(outbox)

        batch = StepBatch(
            new=[
                NewSequence(
                    r.rid, self._jobs[r.rid].sequence.prompt_ids, self._jobs[r.rid].sequence.params
                )
                for r in plan.admitted
            ],
            running=[r.rid for r in plan.running],
            released=[r.rid for r in plan.released],
        )
        if batch.is_empty and not batch.released:
            return True
        jobs = [self._jobs[r.rid] for r in plan.batch]
        with self._cond:
            self._step_started, self._step_jobs = self._clock(), jobs
        try:
            tokens = runner.step(batch)
        except RunnerLost as exc:
            log.error("%s Failing every request; the engine stops.", exc)
            self._fail_everything(jobs, exc)
            return False
        except Exception as exc:
            log.exception("the runner failed a step of %s requests", len(jobs))
            error = EngineError(f"The model failed while generating: {exc}")
            self._finish_step(jobs, {}, error)
            return True
        finally:
            with self._cond:
                self._step_started, self._step_jobs = None, []
                self.is_hung = False
        self.metrics.steps.inc()
        self._finish_step(jobs, tokens, None)
        return True

    def _fail_everything(self, jobs: list[Job], exc: RunnerLost) -> None:
        """The runner is gone: the step's requests fail, the waiting ones too, /health says
        failed (with why) and new requests get 503."""
        with self._cond:
            self.load_error = exc
            self.state = EngineState.FAILED  # `add` refuses from now on
        self._finish_step(jobs, {}, EngineError(f"The model failed while generating: {exc}"))
        unavailable = ServiceUnavailable(f"The model is not available: {exc}")
        with self._cond:
            gone = self.scheduler.expire_all_waiting(FinishReason.ERROR)
            outbox: Outbox = [
                (job, self._finished(job, FinishReason.ERROR, unavailable))
                for job in (self._jobs.pop(req.rid) for req in gone)
            ]
            self._cond.notify_all()  # wake `wait_idle`
        self._hand_over(outbox)

    def _wait_timeout(self) -> float | None:
        deadline = self.scheduler.next_deadline()
        return None if deadline is None else max(0.0, deadline - self._clock())

    def _plan_events(self, plan: SchedulePlan, now: float) -> Outbox:
        """Under the lock: the events a schedule produces (leavers, starters, new positions)."""
        outbox: Outbox = []
        for req in plan.expired:
            job = self._jobs.pop(req.rid)
            error = QueueTimeout(
                f"The request waited {now - req.arrival:.1f} s in the queue, past its deadline, "
                "and was not started."
            )
            outbox.append((job, self._finished(job, FinishReason.ERROR, error)))
        for req in plan.aborted:
            job = self._jobs.pop(req.rid)
            outbox.append((job, self._finished(job, FinishReason.ABORT, job.abort_error)))
        for req in plan.admitted:
            wait = now - req.arrival
            self.metrics.observe_queue_wait(wait)
            self.metrics.prompt_tokens.inc(self._jobs[req.rid].sequence.num_prompt_tokens)
            outbox.append((self._jobs[req.rid], Started(wait)))
        if self._positions_dirty or plan.admitted or plan.expired or plan.released:
            self._positions_dirty = False
            for req, position in self.scheduler.positions():
                job = self._jobs[req.rid]
                if job.last_position != position:
                    job.last_position = position
                    outbox.append((job, Queued(position, self.scheduler.eta(position, now))))
        self.metrics.running.set(self.scheduler.num_running)
        self.metrics.waiting.set(self.scheduler.num_waiting)
        return outbox

    def _finish_step(
        self, jobs: list[Job], tokens: dict[int, int], error: ChatQueueError | None
    ) -> None:
        now = self._clock()
        outbox: Outbox = []
        ended: list[tuple[Job, FinishReason]] = []
        num_tokens = 0
        for job in jobs:
            rid = job.request.rid
            if job.is_failed:  # its client was already told (hang)
                ended.append((job, FinishReason.ERROR))
                continue
            if error is not None:
                step = Step("", FinishReason.ERROR)
            elif rid in tokens:
                before = job.sequence.num_output_tokens
                step = job.sequence.append(tokens[rid])
                num_tokens += job.sequence.num_output_tokens - before  # EOS is not output
                if job.first_token_at is None:
                    job.first_token_at = now
                    self.metrics.ttft.observe(now - job.request.arrival)
            else:
                continue  # still prefilling in chunks
            if step.text:
                outbox.append((job, Token(step.text)))
            if step.finish is not None:
                ended.append((job, step.finish))
                outbox.append((job, self._finished(job, step.finish, error)))
        self.metrics.observe_tokens(num_tokens)
        if ended:
            with self._cond:
                for job, reason in ended:
                    self.scheduler.finish(job.request, reason, now)
                    del self._jobs[job.request.rid]
                self._positions_dirty = True
        self._hand_over(outbox)

    def _finished(
        self, job: Job, reason: FinishReason, error: ChatQueueError | None = None
    ) -> Finished:
        seq = job.sequence
        self.metrics.finished.labels(reason.value).inc()
        usage = Usage(seq.num_prompt_tokens, seq.num_output_tokens)
        return Finished(reason, usage, seq.text, error)

    # -- handing events to the event loop -------------------------------------------------
    def _hand_over(self, outbox: Outbox) -> None:
        """From the engine thread: one hop to the event loop for a whole step's events."""
        if not outbox or self._loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody listens
            self._loop.call_soon_threadsafe(self._deliver, outbox)

    def _deliver(self, outbox: Outbox) -> None:
        """On the event loop.

        NOTE: every stream woken here runs its SSE write in the same loop iteration, before the
        loop polls its sockets again. 256 streams woken at once kept /health (and new requests)
        waiting ~10 ms a step; handing the step's events over in slices lets the loop poll
        between them."""
        for job, event in outbox[:_DELIVERY_SLICE]:
            job.stream.push(event)
            if isinstance(event, Finished) and self._on_finished is not None:
                self._on_finished(job, event)
        if len(outbox) > _DELIVERY_SLICE:
            assert self._loop is not None
            self._loop.call_soon(self._deliver, outbox[_DELIVERY_SLICE:])

"""The engine: one thread that schedules, runs the model a step at a time, and hands the events to
the event loop.

NOTE: which thread runs what.
- The event loop calls `start`, `add`, `abort`, `close_admission`, `abort_everything` and
  `check_hung` (from the watchdog task). Each takes the condition's lock for a few microseconds
  to change the scheduler, never waits on the model, and delivers what it ends itself.
- The engine thread (`_run`) loads the model (when given a factory), then loops in `_step`:
  schedule under the lock, run the model outside it, account for the tokens under it again, and
  send the step's events to the event loop in one hop (`HandOver`). With a pipelined runner (a
  model process) one step stays in flight: step k+1 is sent before step k is handled. When a
  restartable model
  (its own process) dies or is killed for hanging, the same thread restarts it (`_heal`): the
  running requests end with `EngineRestarted`, the waiting ones keep their places.
- A worker thread of the event loop (`asyncio.to_thread`) calls `wait_idle` and `stop`, which
  block.
- Streams see events only on the event loop (`HandOver.deliver`), so nothing a client reads
  is touched by two threads.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import gc
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from chatqueue.engine.handover import HandOver, Outbox
from chatqueue.engine.overlap import OverlapMode, StepOverlap
from chatqueue.engine.runner import (
    NewSequence,
    PagedKV,
    Pipelined,
    Restartable,
    Runner,
    RunnerLost,
    StepBatch,
    StepOutput,
)
from chatqueue.engine.sequence import Sequence, Step
from chatqueue.errors import (
    ChatQueueError,
    EngineError,
    EngineRestarted,
    QueueTimeout,
    ServiceUnavailable,
)
from chatqueue.metrics import Metrics
from chatqueue.scheduler import SchedulePlan, Scheduler
from chatqueue.scheduler.blocks import Allocation, BlockManager
from chatqueue.scheduler.request import RequestState
from chatqueue.types import Finished, FinishReason, Queued, Started

log = logging.getLogger(__name__)


class EngineState(enum.StrEnum):
    LOADING = "loading"
    READY = "ready"
    RESTARTING = "restarting"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """At most `max_restarts` within `window_s` (then the engine fails for good), each attempt
    after a back-off that doubles from `first_backoff_s` up to `max_backoff_s`."""

    max_restarts: int = 5
    window_s: float = 600.0
    first_backoff_s: float = 0.5
    max_backoff_s: float = 10.0


# A step hangs when it runs this many times the longest recent step, and never before this.
AUTO_TIMEOUT_STEPS = 20
AUTO_TIMEOUT_FLOOR_S = 30.0
IDLE_CHECK_S = 1.0  # how often an idle engine makes sure its model process is alive


@dataclass(slots=True)
class _Sent:
    """A step sent to the runner whose output has not been handled yet. `batch` is kept for a
    runner that is not pipelined (it runs when collected)."""

    seqs: list[Sequence]
    batch: StepBatch | None
    sent_at: float


class Engine:
    def __init__(
        self,
        *,
        scheduler: Scheduler[Sequence],
        runner: Runner | Callable[[], Runner],
        metrics: Metrics,
        clock: Callable[[], float],
        on_finished: Callable[[Sequence, Finished], None] | None = None,
        restart_policy: RestartPolicy | None = None,
        stream_interval: int = 1,
        overlap_steps: OverlapMode = "auto",
    ) -> None:
        """`stream_interval`: a stream's text goes out every this many tokens (Sequence.streamed).
        `overlap_steps`: with a pipelined runner (the model in its own process), send each step
        before the output of the one before it is handled (`_step`): on, off, or auto (while the
        server's turnaround is a fair share of the step: `StepOverlap`)."""
        self.scheduler = scheduler
        self.metrics = metrics
        self._runner_source = runner
        self._clock = clock
        self._restart_policy = restart_policy or RestartPolicy()
        self._stream_interval = stream_interval
        self._overlap = StepOverlap(overlap_steps)
        self._is_overlapping = False  # the last step sent was sent with one in flight
        self._in_flight: collections.deque[_Sent] = collections.deque()  # oldest first
        self._restarts: collections.deque[float] = collections.deque()
        self.last_exit: str | None = None  # why the model process last went away
        self.restarting_since: float | None = None
        self._step_times: collections.deque[float] = collections.deque(maxlen=256)
        self._load_time_s = 0.0  # the model's last (re)load took this long
        self._handover = HandOver(on_finished)
        self._cond = threading.Condition()
        self._positions_dirty = False
        self._is_stopping = False
        self._thread: threading.Thread | None = None
        self.runner: Runner | None = runner if isinstance(runner, Runner) else None
        # NOTE: what the runner can do, checked once it is loaded: an isinstance check against
        # a runtime Protocol walks its members (~4 us, more with a cold cache), and the step
        # path asked four times a token (benchmarks/RESULTS.md, issue 17, session 18).
        self._pipelined: Pipelined | None = None
        self._restartable: Restartable | None = None
        self.state = EngineState.LOADING
        self.load_error: BaseException | None = None
        self.loaded = threading.Event()  # set once loading ended, well or not
        self._step_started: float | None = None
        self._last_output_at = 0.0  # perf_counter() when the model last answered a step
        self._step_seqs: list[Sequence] = []
        self.is_hung = False
        self._has_ended = False  # the engine thread has returned
        self.lost: RunnerLost | None = None  # set by `_step` when the model went away
        self._lost_step_seqs: list[Sequence] = []
        self.prefill: dict[str, float | int | None] | None = None  # the runner's, latest told

    # -- the event loop's side (short critical sections only) -----------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self._thread is None, "engine already started"
        self._handover.bind(loop)
        self._thread = threading.Thread(target=self._run, name="chatqueue-engine", daemon=True)
        self._thread.start()

    def add(self, seq: Sequence, now: float) -> None:
        with self._cond:
            if self.state is EngineState.FAILED:
                raise ServiceUnavailable(f"The model is not available: {self.load_error}")
            if self.state is EngineState.RESTARTING:
                raise self.restarting_error()
            self.scheduler.add(seq, now)  # raises QueueFull, ShuttingDown, ...
            self._positions_dirty = True
            self.metrics.waiting.set(self.scheduler.num_waiting)
            self._cond.notify()

    def abort(self, seq: Sequence) -> None:
        """A waiting request is told at once; a running one at the next step, when its slot is
        free. One that already ended is left alone."""
        with self._cond:
            left_queue = self.scheduler.abort(seq)
            if left_queue:
                self._positions_dirty = True
                self.metrics.waiting.set(self.scheduler.num_waiting)
            self._cond.notify()
        if left_queue:
            self._handover.deliver([(seq, self._finished(seq, FinishReason.ABORT))])

    def close_admission(self) -> None:
        with self._cond:
            self.scheduler.close()

    def abort_everything(self, error: ChatQueueError) -> None:
        """Shutdown past its grace period: the queue is emptied, running requests end at the
        next step."""
        with self._cond:
            outbox = self._expire_waiting(error)
            for seq in self.scheduler.running:
                seq.abort_error = error
                self.scheduler.abort(seq)
            self._positions_dirty = True
            self._cond.notify()
        self._handover.deliver(outbox)

    def wait_idle(self, timeout_s: float) -> bool:
        """Blocking: wait until nothing is running or waiting, or the engine has stopped for
        good. True if that happened in time."""
        with self._cond:
            return self._cond.wait_for(
                lambda: not self.scheduler.has_work or self._has_ended, timeout_s
            )

    def step_timeout(self) -> float:
        """The watchdog's limit when none is set: many times the longest recent step (a
        model's steps vary with batch and prompt), and never less than a floor."""
        with self._cond:
            longest = max(self._step_times, default=0.0)
        return max(AUTO_TIMEOUT_FLOOR_S, AUTO_TIMEOUT_STEPS * longest)

    def restarting_error(self) -> ServiceUnavailable:
        return ServiceUnavailable(
            f"The model process stopped ({self.last_exit}) and is being restarted. Retry soon.",
            retry_after_s=self._restart_eta_s(),
        )

    def _restart_eta_s(self) -> int:
        """Seconds until the model is likely back: its last load's time, less what has passed."""
        since = self.restarting_since
        elapsed = 0.0 if since is None else self._clock() - since
        expected = self._restart_policy.first_backoff_s + self._load_time_s
        return max(1, math.ceil(expected - elapsed))

    def check_hung(self, now: float, step_timeout_s: float) -> bool:
        """From the watchdog: if the step in flight has run past `step_timeout_s`, end it: a
        restartable model is killed (and restarted, the waiting keeping their places); else
        every waiting and running request fails instead of hanging. True while hung."""
        with self._cond:
            started = self._step_started
            if self.is_hung or started is None or now - started <= step_timeout_s:
                return self.is_hung
            self.is_hung = True
            runner = self._restartable
            if runner is not None and self._can_restart(now):
                log.error("a step has run for %.1f s: killing the model process", now - started)
                runner.kill()  # the step in flight raises RunnerLost: see `_heal`
                return True
            error = ServiceUnavailable(
                f"The model has not answered for {now - started:.0f} s; the request was failed."
            )
            outbox = self._expire_waiting(error)
            for seq in self._step_seqs:
                seq.is_failed = True
                outbox.append((seq, self._finished(seq, FinishReason.ERROR, error)))
        log.error("a step has run for %.1f s: failing the requests in flight", now - started)
        self._handover.deliver(outbox)
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
        try:
            self._serve()
        finally:
            with self._cond:
                self._has_ended = True
                self._cond.notify_all()  # wake `wait_idle`: nothing will run any more

    def _serve(self) -> None:
        runner = self._load()
        if runner is None:
            return
        # NOTE: loading (and compiling, on a GPU) leaves millions of long-lived objects; a full
        # collection walking them all paused every thread for over a second under load. Frozen,
        # they are never walked again (and handed back to the collector when the engine stops).
        gc.collect()
        gc.freeze()
        try:
            while self._step(runner) or self._heal(runner):
                pass
        finally:
            runner.close()
            gc.unfreeze()
            if self.state is not EngineState.FAILED:
                self.state = EngineState.STOPPED

    def _load(self) -> Runner | None:
        began = time.perf_counter()
        try:
            if self.runner is None:
                assert callable(self._runner_source)
                self.runner = self._runner_source()  # type: ignore[call-arg]
            self._load_time_s = time.perf_counter() - began
            runner = self.runner
            self._pipelined = runner if isinstance(runner, Pipelined) else None
            self._restartable = runner if isinstance(runner, Restartable) else None
            self._use_kv(runner)
            self.state = EngineState.READY
        except BaseException as exc:
            log.exception("loading the model failed")
            self.load_error = exc
            self.state = EngineState.FAILED
        finally:
            self.loaded.set()
        return self.runner if self.state is EngineState.READY else None

    def _step(self, runner: Runner) -> bool:
        """One step: schedule, send it to the model, hand out the results of the step before.
        False when it is time to stop, or the model is lost (`self.lost` says why).

        NOTE: why one step in flight. With the model in its own process, a step's output used
        to be handled (detokenized, checked for stops, handed to the streams) and the next step
        scheduled while the model waited: at 256 rows that host work took as long as the model's
        step, and the two added up (benchmarks/RESULTS.md, issue 14). So step k+1 is scheduled
        and sent before step k's output is handled, as if every running request goes on; the
        model feeds each row the token it sampled itself. A request that k ends (a stop, EOS)
        has one more token computed in k+1, which is dropped, and is released in k+2. Where the
        next step depends on k's tokens (a grammar's mask, a request reaching its length), k is
        handled first (`_may_schedule_ahead`)."""
        if self._in_flight and not self._may_schedule_ahead():
            return self._collect(runner)
        with self._cond:
            while not (self.scheduler.has_work or self._positions_dirty or self._is_stopping):
                self._overlap.note_idle()
                self._cond.wait(self._wait_timeout())
                if not self.scheduler.has_work and self._restartable is not None:
                    try:
                        self._restartable.check_alive()
                    except RunnerLost as exc:  # died while idle: heal before anyone asks
                        self.lost = exc
                        return False
            if self._is_stopping and not self.scheduler.has_work:
                self.lost = None
                return False
            now = self._clock()
            plan = self.scheduler.schedule(now)
            outbox = self._plan_events(plan, now)
            if not self.scheduler.has_work:
                self._cond.notify_all()  # wake `wait_idle`
        self._handover.send(outbox)

        batch = StepBatch(
            new=[_new_sequence(s, plan.allocations.get(s.rid)) for s in plan.admitted],
            running=[s.rid for s in plan.running],
            released=[s.rid for s in plan.released + plan.preempted],
            grown=plan.grown,
            masks={s.rid: mask for s in plan.batch if (mask := s.mask()) is not None},
        )
        if batch.is_empty and not batch.released:
            return self._collect(runner) if self._in_flight else True
        return self._send(runner, plan.batch, batch)

    def _may_schedule_ahead(self) -> bool:
        """Whether the next step can be scheduled before the step in flight is handled: some of
        its requests go on, and none of them needs its token first (a grammar's next mask, or
        the length it reaches)."""
        if not self._overlaps():
            return False
        going_on = [s for s in self._in_flight[-1].seqs if s.state is RequestState.RUNNING]
        return bool(going_on) and not any(
            s.grammar is not None or s.num_output_tokens + s.num_in_flight >= s.max_new_tokens
            for s in going_on
        )

    def _send(self, runner: Runner, seqs: list[Sequence], batch: StepBatch) -> bool:
        """Send the step; then handle the oldest step in flight (a pipelined runner keeps the
        newest running meanwhile)."""
        for seq in seqs:
            seq.num_in_flight += 1
        pipelined = self._overlaps()
        if pipelined is not self._is_overlapping:
            self._is_overlapping = pipelined
            self.metrics.steps_overlapped.set(int(pipelined))
            log.info(
                "a step in flight: %s (%s)", "on" if pipelined else "off", self._overlap.describe()
            )
        self._overlap.note_sent(time.perf_counter())  # may turn it on or off from the next step
        if not pipelined:
            assert not self._in_flight, "a step in flight while overlap is off"
            self._in_flight.append(_Sent(seqs, batch, time.perf_counter()))
            return self._collect(runner)
        assert self._pipelined is not None
        sent = _Sent(seqs, None, time.perf_counter())
        try:
            self._pipelined.send_step(batch)
        except RunnerLost as exc:
            self._in_flight.append(sent)
            return self._lose(exc)
        except Exception as exc:
            self._fail_step(sent, exc)
            return True
        self._in_flight.append(sent)
        return True if len(self._in_flight) == 1 else self._collect(runner)

    def _collect(self, runner: Runner) -> bool:
        """Wait for the oldest step in flight (or run it, for a runner that is not pipelined)
        and hand out its results."""
        sent = self._in_flight[0]
        with self._cond:
            self._step_started = self._clock()
            self._step_seqs = self._seqs_in_flight()
        try:
            if sent.batch is not None:
                output = runner.step(sent.batch)
            else:
                assert self._pipelined is not None
                output = self._pipelined.recv_step()
        except RunnerLost as exc:
            return self._lose(exc)
        except Exception as exc:
            self._fail_step(self._in_flight.popleft(), exc)
            return True
        finally:
            with self._cond:
                self._step_started, self._step_seqs = None, []
                self.is_hung = False
        self._done_with(self._in_flight.popleft())
        # NOTE: a pipelined step ran from when the model was done with the one before it
        self._step_times.append(time.perf_counter() - max(sent.sent_at, self._last_output_at))
        self._last_output_at = time.perf_counter()
        if sent.batch is not None and output.busy_s is not None:  # a round trip, nothing beside
            self._overlap.note_hand_over(self._last_output_at - sent.sent_at - output.busy_s)
        self._overlap.note_output(self._last_output_at)
        self.metrics.steps.inc()
        self._finish_step(sent.seqs, output, None)
        return True

    def _fail_step(self, sent: _Sent, exc: Exception) -> None:
        """The runner raised for this step: its requests end with the error (it stays usable)."""
        self._done_with(sent)
        log.exception("the runner failed a step of %s requests", len(sent.seqs), exc_info=exc)
        self._finish_step(
            sent.seqs, StepOutput({}), EngineError(f"The model failed while generating: {exc}")
        )

    def _overlaps(self) -> bool:
        """Whether a step is kept in flight now: the policy says so and the runner can."""
        return self._overlap.is_on and self._pipelined is not None

    def _done_with(self, sent: _Sent) -> None:
        for seq in sent.seqs:
            seq.num_in_flight -= 1

    def _seqs_in_flight(self) -> list[Sequence]:
        """The requests of the steps in flight, each once (a request is in every one of them)."""
        return list({s.rid: s for sent in self._in_flight for s in sent.seqs}.values())

    def _lose(self, exc: RunnerLost) -> bool:
        """The model went away with steps in flight: their requests are the ones it took."""
        self.lost = exc
        self._lost_step_seqs = self._seqs_in_flight()
        while self._in_flight:
            self._done_with(self._in_flight.popleft())
        return False

    # -- when the model is lost -----------------------------------------------------------
    def _heal(self, runner: Runner) -> bool:
        """After `_step` returned False: True if the model was lost and has been restarted
        (the loop goes on); False to stop (asked to, or the model is gone for good)."""
        exc, self.lost = self.lost, None
        if exc is None:
            return False
        seqs, self._lost_step_seqs = self._lost_step_seqs, []
        last_exit = str(exc).removeprefix("The model process ").rstrip(".")
        restartable = self._restartable
        if restartable is not None and not self._can_restart(self._clock()):
            restartable = None  # the model is gone for good
        with self._cond:
            # NOTE: the state first, then the exit (/health reads them the other way round,
            # without the lock): an exit is never seen beside the state from before it, which
            # said "ok" while the model was gone (a client saw ok, then a 503 "restarting").
            if restartable is not None:
                self.state = EngineState.RESTARTING
                self.restarting_since = self._clock()
            else:
                self.load_error = exc
                self.state = EngineState.FAILED  # `add` refuses from now on
            self.last_exit = last_exit
        self.metrics.model_exits.labels(last_exit).inc()
        if restartable is None:
            log.error("%s Failing every request; the engine stops.", exc)
            self._fail_everything(seqs, exc)
            return False
        log.error("%s Restarting it; the waiting requests keep their places.", exc)
        self._finish_step(
            seqs,
            StepOutput({}),
            EngineRestarted(f"{exc} It is being restarted; this reply was cut short."),
        )
        if not self._restart(restartable):
            self._fail_everything([], exc)
            return False
        with self._cond:
            self._use_kv(runner)  # a new process: its pool starts empty
            self.state = EngineState.READY
            self.restarting_since = None
            self.is_hung = False
            self._positions_dirty = True
            self._cond.notify_all()
        return True

    def _use_kv(self, runner: Runner) -> None:
        """Admit by the runner's KV pool, if it reports one."""
        spec = runner.kv_spec if isinstance(runner, PagedKV) else None
        kv = None
        if spec is not None:
            kv = BlockManager(
                num_blocks=spec.num_blocks,
                block_size=spec.block_size,
                cache_key=spec.cache_key,
                prefix_caching=spec.prefix_caching,
            )
            log.info(
                "KV pool: %s blocks of %s tokens (%s tokens), prefix caching %s",
                spec.num_blocks,
                spec.block_size,
                spec.capacity_tokens,
                "on" if spec.prefix_caching else "off",
            )
        self.scheduler.use_kv(kv)
        self.metrics.observe_kv(kv)

    def _can_restart(self, now: float) -> bool:
        policy = self._restart_policy
        while self._restarts and self._restarts[0] < now - policy.window_s:
            self._restarts.popleft()
        return len(self._restarts) < policy.max_restarts

    def _restart(self, runner: Restartable) -> bool:
        """Start the model again, backing off between attempts; False once the policy says no
        more (or the engine is asked to stop)."""
        policy = self._restart_policy
        backoff = policy.first_backoff_s
        while self._can_restart(self._clock()) and not self._is_stopping:
            time.sleep(backoff)
            self._restarts.append(self._clock())
            self.metrics.model_restarts.inc()
            began = time.perf_counter()
            try:
                runner.restart()
                self._load_time_s = time.perf_counter() - began
            except Exception as exc:
                log.error("restarting the model failed: %s", exc)
                self.last_exit = f"restart failed: {exc}"
                backoff = min(policy.max_backoff_s, backoff * 2)
                continue
            log.info("the model process is back")
            return True
        return False

    def _fail_everything(self, seqs: list[Sequence], exc: RunnerLost) -> None:
        """The runner is gone: the step's requests fail, the waiting ones too, /health says
        failed (with why) and new requests get 503."""
        with self._cond:
            self.load_error = exc
            self.state = EngineState.FAILED  # `add` refuses from now on
        error = EngineError(f"The model failed while generating: {exc}")
        self._finish_step(seqs, StepOutput({}), error)
        with self._cond:
            outbox = self._expire_waiting(ServiceUnavailable(f"The model is not available: {exc}"))
            self._cond.notify_all()  # wake `wait_idle`
        self._handover.send(outbox)

    def _expire_waiting(self, error: ChatQueueError) -> Outbox:
        """Under the lock: empty the queue, each waiting request ending with `error`."""
        return [
            (seq, self._finished(seq, FinishReason.ERROR, error))
            for seq in self.scheduler.expire_all_waiting(FinishReason.ERROR)
        ]

    def _wait_timeout(self) -> float | None:
        deadline = self.scheduler.next_deadline()
        wait = None if deadline is None else max(0.0, deadline - self._clock())
        if self._restartable is not None:
            wait = IDLE_CHECK_S if wait is None else min(wait, IDLE_CHECK_S)
        return wait

    def _plan_events(self, plan: SchedulePlan[Sequence], now: float) -> Outbox:
        """Under the lock: the events a schedule produces (leavers, starters, new positions)."""
        outbox: Outbox = []
        for seq in plan.expired:
            error = QueueTimeout(
                f"The request waited {now - seq.arrival:.1f} s in the queue, past its deadline, "
                "and was not started."
            )
            outbox.append((seq, self._finished(seq, FinishReason.ERROR, error)))
        for seq in plan.aborted:
            outbox.append((seq, self._finished(seq, FinishReason.ABORT, seq.abort_error)))
        for seq in plan.admitted:
            if seq.num_preemptions:  # resumed: its client saw it start, and only sees a pause
                continue
            wait = now - seq.arrival
            self.metrics.observe_queue_wait(wait)
            self.metrics.observe_prompt(seq.num_prompt_tokens, seq.num_cached_tokens)
            outbox.append((seq, Started(wait)))
        if plan.preempted:
            self.metrics.preemptions.inc(len(plan.preempted))
            log.info("KV pool full: %s requests preempted, to resume", len(plan.preempted))
        self.metrics.observe_kv(self.scheduler.kv)
        if self._positions_dirty or plan.admitted or plan.expired or plan.released:
            self._positions_dirty = False
            for seq, position in self.scheduler.positions():
                if seq.started_at is None and seq.last_position != position:
                    seq.last_position = position
                    outbox.append((seq, Queued(position, self.scheduler.eta(position, now))))
        self.metrics.running.set(self.scheduler.num_running)
        self.metrics.waiting.set(self.scheduler.num_waiting)
        return outbox

    def _finish_step(
        self, seqs: list[Sequence], output: StepOutput, error: ChatQueueError | None
    ) -> None:
        now = self._clock()
        outbox: Outbox = []
        ended: list[tuple[Sequence, FinishReason]] = []
        computed: list[tuple[Sequence, int]] = []  # the KV written: every token fed this step
        if output.prefill is not None:
            self.prefill = output.prefill
        num_tokens = 0
        # NOTE: looked up once: this loop runs a token a stream each step, on the engine thread
        running, tokens, logprobs = RequestState.RUNNING, output.tokens, output.logprobs
        paged = self.scheduler.kv is not None
        for seq in seqs:
            if seq.state is not running:
                continue  # ended, or preempted, while this step ran: its token is dropped
            if seq.is_failed:  # its client was already told (hang)
                ended.append((seq, FinishReason.ERROR))
                continue
            if output.cached and seq.rid in output.cached:  # the runner's own prefix reuse
                seq.num_cached_tokens = output.cached[seq.rid]
                self.metrics.observe_cached(seq.num_cached_tokens)
            if error is not None:
                step = Step("", FinishReason.ERROR)
            elif seq.rid in tokens:
                if paged:
                    computed.append((seq, seq.num_tokens))
                before = len(seq.output_ids)
                step = seq.append(tokens[seq.rid], logprobs.get(seq.rid) if logprobs else None)
                num_tokens += len(seq.output_ids) - before  # EOS is not output
                if seq.first_token_at is None:
                    seq.first_token_at = now
                    self.metrics.ttft.observe(now - seq.arrival)
            else:
                continue  # still prefilling in chunks
            token = seq.streamed(step, self._stream_interval)
            if token is not None:
                outbox.append((seq, token))
            if step.finish is not None:
                ended.append((seq, step.finish))
                outbox.append((seq, self._finished(seq, step.finish, error or step.error)))
        self.metrics.observe_tokens(num_tokens)
        if ended or computed:
            with self._cond:
                for seq, num_computed in computed:
                    self.scheduler.note_computed(seq, num_computed)
                for seq, reason in ended:
                    self.scheduler.finish(seq, reason, now)
                self._positions_dirty = self._positions_dirty or bool(ended)
        self._handover.send(outbox)

    def _finished(
        self, seq: Sequence, reason: FinishReason, error: ChatQueueError | None = None
    ) -> Finished:
        self.metrics.finished.labels(reason.value).inc()
        return seq.finished(reason, error)


def _new_sequence(seq: Sequence, allocation: Allocation | None) -> NewSequence:
    """What the runner prefills: the prompt, and after a preemption what was generated too."""
    resumed = bool(seq.num_preemptions and seq.output_ids)
    return NewSequence(
        seq.rid,
        seq.token_ids() if resumed else seq.prompt_ids,
        seq.params,
        num_generated=seq.num_output_tokens if resumed else 0,
        block_table=() if allocation is None else allocation.block_ids,
        num_cached_tokens=0 if allocation is None else allocation.num_cached_tokens,
    )

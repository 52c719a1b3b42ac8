"""Admission and the per-step plan: who runs, who waits, who leaves. Plain data, no I/O, no torch.

NOTE: the algorithm. A request is admitted only if, once the waiting ones have filled the free
slots, it still fits in the waiting queue: running + waiting < max_concurrent + max_queue_size. So
with N free slots and q queue places a burst of N + q is accepted whole and the (N+q+1)-th is
refused at once. At each step, `schedule()` first drops waiting requests whose deadline passed, then
moves requests from the waiting queue (priority first, users in turn) into free slots. A request
that finishes, or is aborted while running, leaves its slot at the next step; one aborted while
waiting leaves the queue at once. Every step's releases are handed to the runner to free its state.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Generic

from chatqueue.errors import InvalidRequest, QueueFull, ShuttingDown, UserQueueFull
from chatqueue.scheduler.blocks import Allocation, BlockManager
from chatqueue.scheduler.drain import DrainRate
from chatqueue.scheduler.request import RequestState
from chatqueue.scheduler.waiting import R, WaitingQueue
from chatqueue.types import FinishReason


@dataclass(slots=True)
class SchedulePlan(Generic[R]):
    admitted: list[R] = field(default_factory=list)  # WAITING -> RUNNING now: prefill
    running: list[R] = field(default_factory=list)  # were running already: decode
    released: list[R] = field(default_factory=list)  # left RUNNING since last step
    aborted: list[R] = field(default_factory=list)  # released by abort: not yet told
    expired: list[R] = field(default_factory=list)  # left the queue at their deadline
    preempted: list[R] = field(default_factory=list)  # RUNNING -> front of the queue: free them
    allocations: dict[int, Allocation] = field(default_factory=dict)  # admitted rid -> its blocks
    grown: dict[int, tuple[int, ...]] = field(default_factory=dict)  # running rid -> blocks added

    @property
    def batch(self) -> list[R]:
        return self.admitted + self.running


class Scheduler(Generic[R]):
    """Holds requests of type R (a Request or a subclass: the engine's Sequence), so what it
    hands back in a plan is the caller's own object."""

    def __init__(
        self,
        *,
        max_concurrent: int,
        max_queue_size: int,
        max_queue_per_user: int | None = None,
        drain_window_s: float = 60.0,
        retry_after_fallback_s: int = 1,
        rng: random.Random | None = None,
    ) -> None:
        assert max_concurrent >= 1, "max_concurrent must be at least 1"
        assert max_queue_size >= 0, "max_queue_size must not be negative"
        self.max_concurrent = max_concurrent
        self.max_queue_size = max_queue_size
        self.max_queue_per_user = max_queue_per_user
        self.retry_after_fallback_s = retry_after_fallback_s
        self._rng = rng or random.Random()
        self.drain = DrainRate(drain_window_s)
        self.waiting: WaitingQueue[R] = WaitingQueue()
        self._running: dict[int, R] = {}
        self._released: list[R] = []
        self._num_aborting = 0
        self._is_closed = False
        self.kv: BlockManager | None = None

    def use_kv(self, kv: BlockManager | None) -> None:
        """Admit by this pool's blocks from now on (None: by slots alone). Called when the
        runner is (re)loaded: no request holds blocks then."""
        assert not self._running, "the pool changes only while nothing runs"
        self.kv = kv

    # -- figures --------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_free_slots(self) -> int:
        return self.max_concurrent - len(self._running) + self._num_aborting

    @property
    def is_full(self) -> bool:
        """No place left: the waiting, once in the free slots, would fill the queue."""
        return self.num_free_places < 1

    @property
    def num_free_places(self) -> int:
        """Requests (sequences) that could be admitted now: free slots and queue places."""
        occupied = len(self._running) - self._num_aborting + len(self.waiting)
        return self.max_concurrent + self.max_queue_size - occupied

    @property
    def has_work(self) -> bool:
        return bool(self._running or self._released or len(self.waiting))

    @property
    def is_closed(self) -> bool:
        return self._is_closed

    def next_deadline(self) -> float | None:
        deadlines = [r.deadline for r in self._never_started() if r.deadline is not None]
        return min(deadlines, default=None)

    @property
    def num_live_tokens(self) -> int:
        """Tokens the running requests hold (a shared prefix counted for each)."""
        return sum(r.num_tokens for r in list(self._running.values()))

    @property
    def running(self) -> list[R]:
        return list(self._running.values())

    # -- admission ------------------------------------------------------------------------
    def check_room(self, now: float, num_places: int = 1) -> None:
        """Raise the error that says why a new request of `num_places` sequences (its choices)
        would be refused now, if it would be (closed, full, or larger than the server ever
        holds). Callers check early, before paying for tokenization; `add` checks again."""
        if self._is_closed:
            raise ShuttingDown("The server is shutting down and takes no new requests.")
        most = self.max_concurrent + self.max_queue_size
        if num_places > most:
            raise InvalidRequest(
                f"This request has {num_places} choices, each a sequence that needs a place; "
                f"this server holds at most {most} ({self.max_concurrent} running, "
                f"{self.max_queue_size} waiting).",
                param="n",
            )
        if self.num_free_places < num_places:
            needs = f" This request needs {num_places} places at once." if num_places > 1 else ""
            raise QueueFull(
                f"The server is at capacity ({self.max_concurrent} running, "
                f"{self.max_queue_size} waiting). Retry later.{needs}",
                retry_after_s=self.retry_after_spread(now),
            )

    def add(self, req: R, now: float) -> None:
        """Admit `req` to the waiting queue, or raise the one error that says why not."""
        assert req.state is RequestState.WAITING
        self.check_room(now)
        cap = req.max_queue_per_user or self.max_queue_per_user
        key = req.counted_as
        if cap is not None and key and self.waiting.count_for(key) >= cap:
            raise UserQueueFull(
                f"You already have {cap} requests waiting, the most one user may queue. "
                "Retry when one has started.",
                retry_after_s=self.retry_after_spread(now),
            )
        self.drain.mark_busy(now)
        self.waiting.push(req)

    def close(self) -> None:
        """Stop admitting; what is queued or running carries on."""
        self._is_closed = True

    # -- leaving --------------------------------------------------------------------------
    def abort(self, req: R) -> bool:
        """Abort in either state. True if it left the queue now (the caller tells its client);
        a running request leaves at the next step and comes back in `SchedulePlan.aborted`."""
        if req.state is RequestState.WAITING:
            self.waiting.remove(req)
            self._finish(req, FinishReason.ABORT)
            return True
        if req.state is RequestState.RUNNING and not req.abort_requested:
            req.abort_requested = True
            self._num_aborting += 1
        return False

    def finish(self, req: R, reason: FinishReason, now: float) -> None:
        """The engine saw this running request end (stop, length, error): free its slot."""
        assert req.state is RequestState.RUNNING, f"request {req.rid} is {req.state}"
        if req.abort_requested:
            self._num_aborting -= 1
        del self._running[req.rid]
        if self.kv is not None:
            self.kv.free(req.rid)
        self._released.append(req)
        self._finish(req, reason)
        if reason is not FinishReason.ERROR:
            self.drain.record(now)

    def expire_all_waiting(self, reason: FinishReason) -> list[R]:
        """Empty the queue (shutdown, a hung runner). The caller tells each client why."""
        gone = list(self.waiting.in_order())
        for req in gone:
            self.waiting.remove(req)
            self._finish(req, reason)
        return gone

    def note_computed(self, req: R, num_computed: int) -> None:
        """The runner has written the KV of `req`'s first `num_computed` tokens: its full blocks
        become findable by later requests."""
        kv = self.kv
        if kv is not None and kv.needs_marking(req.rid, num_computed):
            kv.mark_computed(req.rid, req.token_ids(), num_computed)

    # -- the step -------------------------------------------------------------------------
    def schedule(self, now: float) -> SchedulePlan[R]:
        plan: SchedulePlan[R] = SchedulePlan(expired=self._expire(now))
        plan.aborted = self._release_aborted(now)
        plan.released, self._released = self._released, []
        if self.kv is not None:
            self._grow_running(self.kv, plan)
        plan.running = list(self._running.values())
        # NOTE: none admitted in a step that had to preempt: the pool is short right now
        while not plan.preempted and len(self.waiting) and len(self._running) < self.max_concurrent:
            if not self._admit_next(now, plan):
                break
        if not self.has_work:
            self.drain.mark_idle()
        return plan

    def _admit_next(self, now: float, plan: SchedulePlan[R]) -> bool:
        """Move the request at the head of the queue into a slot, with its blocks; False if its
        blocks cannot be had now (it waits, and so does everyone behind it)."""
        req = self.waiting.peek()
        kv = self.kv
        if kv is not None:
            ids = req.token_ids()
            if not kv.can_allocate(ids):
                return False
            allocation = kv.allocate(req.rid, ids)
            plan.allocations[req.rid] = allocation
            if req.started_at is None:
                req.num_cached_tokens = allocation.num_cached_tokens
        self.waiting.pop()
        req.state = RequestState.RUNNING
        if req.started_at is None:
            req.started_at = now
        self._running[req.rid] = req
        plan.admitted.append(req)
        return True

    def _grow_running(self, kv: BlockManager, plan: SchedulePlan[R]) -> None:
        """Room for each running request's next token, oldest first, preempting the newest
        while the pool is short."""
        for req in list(self._running.values()):
            if req.rid not in self._running:
                continue  # preempted for an older one
            num_tokens = req.num_tokens + req.num_in_flight
            while not kv.can_append(req.rid, num_tokens):
                newest = next(reversed(self._running.values()))
                self._preempt(kv, newest, plan)
                if newest is req:
                    break
            else:
                if added := kv.append(req.rid, num_tokens):
                    plan.grown[req.rid] = tuple(added)

    def _preempt(self, kv: BlockManager, req: R, plan: SchedulePlan[R]) -> None:
        kv.free(req.rid)
        del self._running[req.rid]
        req.state = RequestState.WAITING
        req.num_preemptions += 1
        plan.grown.pop(req.rid, None)
        self.waiting.push_front(req)
        plan.preempted.append(req)

    def _never_started(self) -> list[R]:
        """Waiting requests that never ran (a preempted one has started: no queue deadline)."""
        return [r for r in self.waiting.in_order() if r.started_at is None]

    def _expire(self, now: float) -> list[R]:
        expired = [r for r in self._never_started() if r.deadline is not None and r.deadline <= now]
        for req in expired:
            self.waiting.remove(req)
            self._finish(req, FinishReason.ERROR)
        return expired

    def _release_aborted(self, now: float) -> list[R]:
        aborted = [r for r in self._running.values() if r.abort_requested]
        for req in aborted:
            self.finish(req, FinishReason.ABORT, now)
        return aborted

    @staticmethod
    def _finish(req: R, reason: FinishReason) -> None:
        req.state = RequestState.FINISHED
        req.finish_reason = reason

    # -- where the waiting stand ----------------------------------------------------------
    def positions(self) -> list[tuple[R, int]]:
        """Waiting requests with their 1-based place in admission order."""
        return [(req, i) for i, req in enumerate(self.waiting.in_order(), start=1)]

    def eta(self, position: int, now: float) -> float | None:
        """Seconds until the request at `position` takes a slot, from the measured drain rate."""
        ahead = position - self.num_free_slots
        if ahead <= 0:
            return 0.0
        rate = self.drain.rate(now)
        return None if rate is None else ahead / rate

    def retry_after(self, now: float) -> int:
        """Whole seconds until a queue place is likely free: one completion at the drain rate."""
        rate = self.drain.rate(now)
        if rate is None:
            return self.retry_after_fallback_s
        return max(1, math.ceil(1.0 / rate))

    def retry_after_spread(self, now: float) -> int:
        """What a refused client is told: a time drawn at random between one completion and the
        drain of everything waiting now, at the measured rate.

        NOTE: why spread. Told the time of one completion, every client refused during a burst
        came back in the same second (3,400 refusals all said 1 while the queue took 20 s to
        drain), to be refused again. Spread over the time the queue needs, the retries arrive
        about as fast as places free up."""
        rate = self.drain.rate(now)
        if rate is None:
            return self.retry_after_fallback_s
        drained = (len(self.waiting) + 1) / rate
        return max(1, math.ceil(self._rng.uniform(1.0 / rate, max(1.0 / rate, drained))))

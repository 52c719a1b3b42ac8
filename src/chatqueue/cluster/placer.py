"""The front's placement: the requests that arrive together (in one event-loop iteration, or
while the placement before them is on its way) go to the replicas as one wave, one call a
replica a round (`placement.plan_round`), rather than a Serve call each.

A wave goes on the front's own line to the replica (`link`) where the replica publishes one, else
(or when the line breaks) by a Serve call.

NOTE: why waves. A Serve call costs both ends ~4 ms of CPU on the 2-vCPU machines whatever it
carries (`benchmarks/micro_serve_calls.py`); one call for 32 requests costs ~0.5 ms a request. A
lone request is not held back: its wave leaves on the next loop iteration. One wave is placed at
a time, so the figures each plan reads count every admission this front has had answered."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ray.exceptions import RayError
from ray.serve.handle import DeploymentHandle

from chatqueue.api.wire import Admitted, Refused, Submission
from chatqueue.cluster.ledger import Ledger
from chatqueue.cluster.link import LineBroken, Lines
from chatqueue.cluster.placement import plan_round
from chatqueue.cluster.policy import RouteHint
from chatqueue.cluster.stats import ReplicaStats
from chatqueue.cluster.wave import Wave, WaveAnswer
from chatqueue.errors import ChatQueueError, QueueFull, ServiceUnavailable, UserQueueFull

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Pending:
    """A request waiting for its wave's answer."""

    submission: Submission
    prefer: str | None
    answer: asyncio.Future[Admitted]
    refusals: list[Refused] = field(default_factory=list)


class NoReplica(Exception):
    """Every replica asked went away, or none was there to ask."""


class Placer:
    def __init__(
        self,
        handle: DeploymentHandle[Any],
        *,
        front: str,
        ledger: Ledger,
        replicas: Callable[[], Sequence[tuple[str, ReplicaStats | None]]],
        on_orphan: Callable[[str, str], None],
        on_taken_elsewhere: Callable[[], None],
        on_call: Callable[[int, str], None],
        lines: Lines | None = None,
    ) -> None:
        """`replicas`: what the router sees now; `on_orphan(replica, key)`: a request was
        admitted after its caller stopped waiting (the replica must abort it);
        `on_taken_elsewhere()`: a replica took a request that another had refused;
        `on_call(n, by)`: a wave asked a replica to take n requests, `by` its line or Serve;
        `lines`: the front's own lines to the replicas (None: Serve calls only)."""
        self.front = front
        self._handle = handle
        self._ledger = ledger
        self._replicas = replicas
        self._on_orphan = on_orphan
        self._on_taken_elsewhere = on_taken_elsewhere
        self._on_call = on_call
        self._lines = lines
        self._lost: set[str] = set()  # replicas that went away (their ids are never reused)
        self._next: list[Pending] = []
        self._task: asyncio.Task[None] | None = None

    def lost(self, replica: str) -> None:
        self._lost.add(replica)
        if self._lines is not None:
            self._lines.forget(replica)

    async def place(self, submission: Submission, prefer: str | None) -> Admitted:
        """The replica's admission; raises `Unplaced` (every refusal it met) or `NoReplica`."""
        loop = asyncio.get_running_loop()
        pending = Pending(submission, prefer, loop.create_future())
        self._next.append(pending)
        if self._task is None:
            self._task = loop.create_task(self._run())  # NOTE: starts on the next iteration
        return await pending.answer

    async def _run(self) -> None:
        try:
            while self._next:
                wave, self._next = self._next, []
                await self._place(wave)
        finally:
            self._task = None
            for pending in self._next:  # only if placing failed outright
                _settle(pending, NoReplica("The front's placement stopped."))

    async def _place(self, batch: list[Pending]) -> None:
        left = [p for p in batch if not p.answer.done()]
        unavailable: set[str] = set()  # loading, restarting, shutting down: for both passes
        # NOTE: with one replica to ask there is no other free slot to prefer: one pass, for
        # any place, saves the second call whenever the figures promised more slots than it had.
        passes = (True, False) if len(self._asked()) > 1 else (False,)
        try:
            for slots_only in passes:
                closed = set(unavailable)
                while left:
                    rows = self._asked()
                    prefers = [p.prefer for p in left]
                    plan = plan_round(
                        prefers, self._ledger.candidates(rows), slots_only=slots_only, closed=closed
                    )
                    if not plan:
                        break
                    groups = {r: [left[i] for i in indexes] for r, indexes in plan.items()}
                    lines = {r: s.link for r, s in rows if s is not None}
                    answers = await asyncio.gather(
                        *(
                            self._ask(r, lines.get(r, ""), group, slots_only)
                            for r, group in groups.items()
                        )
                    )
                    for (replica, group), answer in zip(groups.items(), answers, strict=True):
                        self._take(replica, group, answer, closed, unavailable)
                    left = [p for p in left if not p.answer.done()]
        except Exception as exc:  # a bug: say so to each caller rather than hang them
            log.exception("placing a wave failed")
            for pending in left:
                _settle(pending, exc)
            return
        for pending in left:
            _settle(pending, Unplaced(pending.refusals) if pending.refusals else NoReplica())

    def _asked(self) -> list[tuple[str, ReplicaStats | None]]:
        """The replicas a wave may ask: those the router routes to, less those gone."""
        return [(r, s) for r, s in self._replicas() if r not in self._lost]

    async def _ask(
        self, replica: str, address: str, group: list[Pending], slots_only: bool
    ) -> WaveAnswer | None:
        wave = Wave(self.front, tuple(p.submission for p in group), slots_only)
        line = self._lines.to(replica, address) if self._lines is not None else None
        if line is not None:
            try:
                taken = await line.place(wave)
                self._on_call(len(group), "line")
                return taken if taken.replica == replica else None
            except LineBroken as exc:  # by Serve, then: a request it took is answered the same
                log.info("placing on replica %s by Serve: %s", replica, exc)
        self._on_call(len(group), "serve")
        try:
            answer: WaveAnswer = await self._handle.place.remote(
                wave, route=RouteHint(only=replica)
            )
        except RayError as exc:
            log.warning("replica %s went away while asked to admit requests: %s", replica, exc)
            return None
        return answer if answer.replica == replica else None

    def _take(
        self,
        replica: str,
        group: list[Pending],
        answer: WaveAnswer | None,
        closed: set[str],
        unavailable: set[str],
    ) -> None:
        if answer is None:  # gone: another replica said so, or the call failed
            self.lost(replica)
            return
        if answer.stats is not None:
            self._ledger.answered(answer.stats)
        at = answer.stats.sampled_at if answer.stats is not None else time.time()
        for pending, outcome in zip(group, answer.outcomes, strict=True):
            if outcome is None:
                closed.add(replica)  # no free slot left
            elif isinstance(outcome, Admitted):
                self._ledger.admitted(replica, at)
                if pending.refusals:
                    self._on_taken_elsewhere()
                if pending.answer.done():  # its caller stopped waiting
                    self._on_orphan(replica, pending.submission.key)
                else:
                    pending.answer.set_result(outcome)
            elif may_try_next(outcome.error):
                pending.refusals.append(outcome)
                closed.add(replica)
                if not isinstance(outcome.error, QueueFull):
                    unavailable.add(replica)
            else:
                pending.refusals.append(outcome)
                _settle(pending, Unplaced(pending.refusals))


class Unplaced(Exception):
    """Every replica asked refused the request (the last refusal a final one, such as a bad
    request, or each asked was full or unavailable)."""

    def __init__(self, refusals: list[Refused]) -> None:
        super().__init__(refusals[-1].error.message)
        self.refusals = refusals


def may_try_next(error: ChatQueueError) -> bool:
    """Refusals another replica may not give: full, loading, restarting, shutting down. Not a
    bad request, and not a user's own cap (asking elsewhere would let one user past it)."""
    if isinstance(error, UserQueueFull):
        return False
    return isinstance(error, QueueFull | ServiceUnavailable)


def _settle(pending: Pending, exc: BaseException) -> None:
    if not pending.answer.done():
        pending.answer.set_exception(exc)

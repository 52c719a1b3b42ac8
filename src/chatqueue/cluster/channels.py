"""The front's end of the replicas' channels: the requests it has placed, by key; each replica's
batches of events (`outbox`) handed to their streams; the aborts of requests whose clients went
away, batched into one call a replica; and the end of every request a replica takes with it when
it dies (its channel breaks, or the replica is no longer among the router's).

A placed request has no Serve call of its own: its events, its end and its loss all come on the
front's channel to its replica (one open call per replica while the front has requests there).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from chatqueue.api import RequestStream
from chatqueue.api.outbox import decode
from chatqueue.cluster.leases import RENEW_EVERY_S
from chatqueue.cluster.policy import RouteHint
from chatqueue.errors import ChatQueueError, ReplicaLost
from chatqueue.types import Event, Finished, FinishReason, Started, Token, Usage

log = logging.getLogger(__name__)

REOPEN_AFTER_S = 0.05  # a channel that ended with nothing for requests still placed
ABORT_TIMEOUT_S = 5.0  # how long a stopping front waits for its aborts to be taken


@dataclass(eq=False)
class Placed:
    """A request the front has sent to a replica, as the front follows it."""

    key: str
    stream: RequestStream
    started: float  # time.monotonic() when it was submitted
    waits_as: str | None = None  # the user cap's key it counts against while it waits
    replica: str = ""
    has_started: bool = False
    num_tokens: int = 0
    parts: list[str] = field(default_factory=list)


class Channels:
    def __init__(
        self,
        handle: DeploymentHandle[Any],
        *,
        max_unread_tokens: int,
        on_event: Callable[[Placed, Event], None],
        is_listed: Callable[[str], bool],
        on_lost: Callable[[str], None],
    ) -> None:
        """`is_listed(replica)`: the router still routes to it; `on_lost(replica)`: it died."""
        self.front = uuid.uuid4().hex  # this front's name to the replicas
        self._handle = handle
        self._streaming = handle.options(stream=True)  # NOTE: made once; options() copies
        self._max_unread_tokens = max_unread_tokens
        self._on_event = on_event
        self._is_listed = is_listed
        self._on_lost = on_lost
        self._keys = itertools.count(1)
        self._placed: dict[str, Placed] = {}
        self._emptied = asyncio.Event()
        self._channels: dict[str, asyncio.Task[None]] = {}  # by replica
        self._waiting: dict[str, int] = {}  # by user cap key: placed, not started yet
        self._aborts: dict[str, list[str]] = {}  # by replica: keys to abort on the next call
        self._sending: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._placed)

    def waiting_for(self, cap_key: str) -> int:
        """This user's requests waiting on any replica, as far as the front has heard."""
        return self._waiting.get(cap_key, 0)

    # -- a request's life -----------------------------------------------------------------
    def new(self, started: float) -> Placed:
        """A request about to be placed: its channel events find it by its key from now
        (they may come before its admission does)."""
        key = f"{next(self._keys):x}"
        stream = RequestStream(
            "", on_abandon=lambda: self._abandon(key), max_unread_tokens=self._max_unread_tokens
        )
        placed = Placed(key, stream, started)
        self._placed[key] = placed
        self._emptied.clear()
        return placed

    def refused(self, placed: Placed) -> None:
        self._forget(placed.key)

    def admitted(self, placed: Placed, replica: str, request_id: str, waits_as: str | None) -> None:
        placed.replica = replica
        placed.stream.request_id = request_id
        if placed.key not in self._placed:  # it has ended already (its replica died)
            return
        if waits_as is not None and not placed.has_started:
            placed.waits_as = waits_as
            self._waiting[waits_as] = self._waiting.get(waits_as, 0) + 1
        channel = self._channels.get(replica)
        if channel is None or channel.done():
            self._channels = {r: c for r, c in self._channels.items() if not c.done()}
            self._channels[replica] = asyncio.create_task(self._channel(replica))

    def _abandon(self, key: str) -> None:
        """The client went away: its replica aborts it (on the next abort call there)."""
        placed = self._forget(key)
        if placed is not None:
            self._no_longer_waiting(placed)
            if placed.replica:
                self.abort(placed.replica, key)

    def abort(self, replica: str, key: str) -> None:
        """Abort `key` on `replica`: the keys of one loop iteration go in one call."""
        keys = self._aborts.setdefault(replica, [])
        keys.append(key)
        if len(keys) == 1:
            asyncio.get_running_loop().call_soon(self._send_aborts, replica)

    def _send_aborts(self, replica: str) -> None:
        keys = self._aborts.pop(replica, [])
        if keys:
            task = asyncio.ensure_future(self._send_abort(replica, keys))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send_abort(self, replica: str, keys: list[str]) -> None:
        try:
            await self._handle.abort.remote(self.front, keys, route=RouteHint(only=replica))
        except Exception as exc:  # gone: its requests went with it
            log.debug("aborts to replica %s not taken: %s", replica, exc)

    def end(
        self, placed: Placed, error: ChatQueueError, reason: FinishReason = FinishReason.ERROR
    ) -> None:
        """End a request the front can no longer follow, with what it got so far."""
        if self._forget(placed.key) is None:
            return
        finished = Finished(
            reason, Usage(0, placed.num_tokens), text="".join(placed.parts), error=error
        )
        self._deliver(placed, [finished])

    def _forget(self, key: str) -> Placed | None:
        placed = self._placed.pop(key, None)
        if not self._placed:
            self._emptied.set()
        return placed

    # -- the channels ---------------------------------------------------------------------
    async def _channel(self, replica: str) -> None:
        """The channel to `replica`, reopened while the front has requests there when it ends
        (the replica ends it a while after its last request of ours). It breaks when the
        replica dies, and another replica answers it at once once this one is gone from the
        router's list: either way the requests there end with `replica_lost`."""
        renewing = asyncio.create_task(self._renew(replica))
        try:
            await self._follow(replica)
        finally:
            renewing.cancel()

    async def _renew(self, replica: str) -> None:
        """This front's lease on `replica` (`leases`), renewed while its channel is open."""
        while True:
            await asyncio.sleep(RENEW_EVERY_S)
            try:
                await self._handle.renew.remote(self.front, route=RouteHint(only=replica))
            except Exception as exc:  # gone: its channel breaks too
                log.debug("lease on replica %s not renewed: %s", replica, exc)

    async def _follow(self, replica: str) -> None:
        while True:
            call: DeploymentResponseGenerator[Any] = self._streaming.events.remote(
                self.front, route=RouteHint(only=replica)
            )  # type: ignore[assignment]
            got = False
            try:
                async for data in call:
                    got = True
                    for key, events in decode(data):
                        placed = self._placed.get(key)
                        if placed is not None:
                            self._deliver(placed, events)
            except asyncio.CancelledError:
                call.cancel()
                raise
            except Exception as exc:
                log.warning("the channel to replica %s broke: %s", replica, exc)
                self.lose(replica)
                return
            if not any(p.replica == replica for p in self._placed.values()):
                return
            if not got:
                if not self._is_listed(replica):
                    self.lose(replica)
                    return
                await asyncio.sleep(REOPEN_AFTER_S)

    def lose(self, replica: str) -> None:
        """`replica` died: its requests end with what they got."""
        self._on_lost(replica)
        for placed in [p for p in self._placed.values() if p.replica == replica]:
            self.end(placed, ReplicaLost())

    def _deliver(self, placed: Placed, events: list[Event]) -> None:
        for event in events:
            self._on_event(placed, event)
            if isinstance(event, Token):
                placed.parts.append(event.text)
                placed.num_tokens += event.num_tokens
            elif isinstance(event, Started):
                placed.has_started = True
                self._no_longer_waiting(placed)
            elif isinstance(event, Finished):
                self._no_longer_waiting(placed)
                self._forget(placed.key)
            placed.stream.push(event)

    def _no_longer_waiting(self, placed: Placed) -> None:
        if placed.waits_as is None:
            return
        left = self._waiting[placed.waits_as] - 1
        if left:
            self._waiting[placed.waits_as] = left
        else:
            del self._waiting[placed.waits_as]
        placed.waits_as = None

    # -- the end --------------------------------------------------------------------------
    async def drain(self, timeout_s: float, error: ChatQueueError) -> None:
        """Let the placed requests finish for up to `timeout_s`; end the rest with `error`
        (their replicas abort them)."""
        if self._placed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._emptied.wait(), timeout_s)
        for placed in list(self._placed.values()):
            self.end(placed, error, FinishReason.ABORT)
            if placed.replica:
                self.abort(placed.replica, placed.key)
        await asyncio.sleep(0)  # the aborts' calls leave
        if self._sending:
            await asyncio.wait(set(self._sending), timeout=ABORT_TIMEOUT_S)
        for channel in self._channels.values():
            channel.cancel()

"""The front's end of the replicas' channels: the requests it has placed, by key; each replica's
batches of events (`outbox`) handed to their streams; and the end of every request a replica
takes with it when it dies.

A placed request has two calls to its replica: the submitting call, which the replica keeps
open until the request's end has gone out on the channel (its failure: the replica is gone;
cancelling it: the client went away, the replica aborts), and its share of the front's channel to
that replica (one open call per replica while the front has requests there), which carries the
events.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from chatqueue.api import RequestStream
from chatqueue.api.outbox import decode
from chatqueue.cluster.policy import RouteHint
from chatqueue.errors import ChatQueueError, ReplicaLost
from chatqueue.types import Event, Finished, FinishReason, Started, Token, Usage

log = logging.getLogger(__name__)

# NOTE: the submitting call ends once the request's Finished is on the channel; the channel's
# message may still be on its way. Only a channel that is gone leaves it out for longer.
FINISH_GRACE_S = 10.0
REOPEN_AFTER_S = 0.05  # a channel that ended with nothing for requests still placed


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
    done: asyncio.Event = field(default_factory=asyncio.Event)
    watcher: asyncio.Task[None] | None = None


class Channels:
    def __init__(
        self,
        streaming: DeploymentHandle[Any],
        *,
        max_unread_tokens: int,
        on_event: Callable[[Placed, Event], None],
    ) -> None:
        self.front = uuid.uuid4().hex  # this front's name to the replicas
        self._streaming = streaming  # the replicas' handle with stream=True
        self._max_unread_tokens = max_unread_tokens
        self._on_event = on_event
        self._keys = itertools.count(1)
        self._placed: dict[str, Placed] = {}
        self._channels: dict[str, asyncio.Task[None]] = {}  # by replica
        self._waiting: dict[str, int] = {}  # by user cap key: placed, not started yet

    def __len__(self) -> int:
        return len(self._placed)

    def waiting_for(self, cap_key: str) -> int:
        """This user's requests waiting on any replica, as far as the front has heard."""
        return self._waiting.get(cap_key, 0)

    # -- a request's life -----------------------------------------------------------------
    def new(self, started: float) -> Placed:
        """A request about to be submitted: its channel events find it by its key from now
        (they may come before its admission does)."""
        key = f"{next(self._keys):x}"
        stream = RequestStream(
            "", on_abandon=lambda: self._abandon(key), max_unread_tokens=self._max_unread_tokens
        )
        placed = Placed(key, stream, started)
        self._placed[key] = placed
        return placed

    def refused(self, placed: Placed) -> None:
        self._placed.pop(placed.key, None)

    def admitted(
        self,
        placed: Placed,
        replica: str,
        request_id: str,
        call: DeploymentResponseGenerator[Any],
        waits_as: str | None,
    ) -> None:
        placed.replica = replica
        placed.stream.request_id = request_id
        if waits_as is not None and not placed.has_started and not placed.done.is_set():
            placed.waits_as = waits_as
            self._waiting[waits_as] = self._waiting.get(waits_as, 0) + 1
        placed.watcher = asyncio.create_task(self._watch(placed, call))
        channel = self._channels.get(replica)
        if channel is None or channel.done():
            self._channels = {r: c for r, c in self._channels.items() if not c.done()}
            self._channels[replica] = asyncio.create_task(self._channel(replica))

    def _abandon(self, key: str) -> None:
        """The client went away: cancelling the submitting call makes the replica abort."""
        placed = self._placed.pop(key, None)
        if placed is not None:
            self._no_longer_waiting(placed)
            if placed.watcher is not None:
                placed.watcher.cancel()

    async def _watch(self, placed: Placed, call: DeploymentResponseGenerator[Any]) -> None:
        try:
            async for _ in call:
                pass
        except asyncio.CancelledError:
            call.cancel()
            raise
        except Exception as exc:
            log.warning("replica %s lost a request: %s", placed.replica, exc)
            self.end(placed, ReplicaLost())
            return
        try:
            await asyncio.wait_for(placed.done.wait(), FINISH_GRACE_S)
        except TimeoutError:
            self.end(placed, ReplicaLost("The replica ended this request without finishing it."))

    def end(
        self, placed: Placed, error: ChatQueueError, reason: FinishReason = FinishReason.ERROR
    ) -> None:
        """End a request the front can no longer follow, with what it got so far."""
        if self._placed.pop(placed.key, None) is None:
            return
        finished = Finished(
            reason, Usage(0, placed.num_tokens), text="".join(placed.parts), error=error
        )
        self._deliver(placed, [finished])

    # -- the channels ---------------------------------------------------------------------
    async def _channel(self, replica: str) -> None:
        """The channel to `replica`, reopened while the front has requests there when it ends
        (the replica ends it a while after its last request of ours); it fails when the
        replica dies (the requests' own calls end them then)."""
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
                return
            if not any(p.replica == replica for p in self._placed.values()):
                return
            if not got:
                await asyncio.sleep(REOPEN_AFTER_S)

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
                self._placed.pop(placed.key, None)
                placed.done.set()
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
        watchers = {p.watcher for p in self._placed.values() if p.watcher is not None}
        if watchers:
            await asyncio.wait(watchers, timeout=timeout_s)
        for placed in list(self._placed.values()):
            self.end(placed, error, FinishReason.ABORT)
            if placed.watcher is not None:
                placed.watcher.cancel()
        for channel in self._channels.values():
            channel.cancel()

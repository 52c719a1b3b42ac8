"""A request as the scheduler sees it: identity, fairness keys, and the one state machine."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from chatqueue.types import FinishReason


class RequestState(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False, slots=True)
class Request:
    """`rid` is the request's one id, from admission to the runner's rows. The engine's
    Sequence extends this record; the scheduler reads and sets only the fields here."""

    rid: int
    arrival: float
    user: str = ""
    priority: int = 0
    deadline: float | None = None  # queue-wait deadline (monotonic seconds)
    max_queue_per_user: int | None = None  # this user's own cap, in place of the server's
    # NOTE: whom the per-user cap counts against, when that is not `user`: `user` may be a name
    # the client picks per request (OpenAI's `user` field), which a flood would change every time.
    cap_key: str | None = None

    @property
    def counted_as(self) -> str:
        """The key of the per-user waiting cap: `cap_key`, else `user`."""
        return self.user if self.cap_key is None else self.cap_key

    state: RequestState = RequestState.WAITING
    started_at: float | None = None
    finish_reason: FinishReason | None = None
    abort_requested: bool = False  # running, to leave at the next step

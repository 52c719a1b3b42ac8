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
    rid: int
    arrival: float
    user: str = ""
    priority: int = 0
    deadline: float | None = None  # queue-wait deadline (monotonic seconds)
    max_queue_per_user: int | None = None  # this user's own cap, in place of the server's
    state: RequestState = RequestState.WAITING
    started_at: float | None = None
    finish_reason: FinishReason | None = None
    abort_requested: bool = False  # running, to leave at the next step

    @property
    def is_finished(self) -> bool:
        return self.state is RequestState.FINISHED

    @property
    def queue_wait(self) -> float | None:
        return None if self.started_at is None else self.started_at - self.arrival

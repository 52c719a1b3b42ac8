"""A request as the scheduler sees it: identity, fairness keys, and the one state machine."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

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

    # its tokens, for KV memory: the prompt, then what it generated (set by the engine)
    prompt_ids: Sequence[int] = ()
    output_ids: list[int] = field(default_factory=list)

    state: RequestState = RequestState.WAITING
    started_at: float | None = None
    finish_reason: FinishReason | None = None
    abort_requested: bool = False  # running, to leave at the next step
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache when it first started
    num_preemptions: int = 0  # times its KV was taken back to let older requests go on
    # NOTE: a step scheduled while the one before it still runs (the engine keeps one in flight)
    # feeds the token that step will sample: the KV needs room for it too (set by the engine)
    num_in_flight: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_ids(self) -> list[int]:
        return [*self.prompt_ids, *self.output_ids]

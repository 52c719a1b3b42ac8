"""The messages between an API server and the core, and how they travel: pickled, each frame
prefixed with its length (`api.frames`), over a Unix socket in a folder only this user can open.

An API server asks with a `Call` (a submission, a caller's share of its rate limit, /load's and
/metrics' figures)
and the core answers with a `Reply` of the same id; `Abandon` says a request's client went away.
The core sends each step's events of all the API server's requests in one `Events` frame
(`api.outbox`), and a `Snapshot` of its state every `SNAPSHOT_EVERY_S` (what /health reads; /load
asks for figures of the moment).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from chatqueue.api.admission import TokenBudget
from chatqueue.api.chat_queue import LoadInfo
from chatqueue.api.frames import read as read  # the link's own framing, as `link.read`
from chatqueue.api.frames import write as write
from chatqueue.api.outbox import Batch
from chatqueue.api.wire import Admitted, Description, Refused, Submission
from chatqueue.errors import ChatQueueError, ServiceUnavailable
from chatqueue.types import Event, Token

SNAPSHOT_EVERY_S = 0.1


@dataclass(frozen=True, slots=True)
class RateCheck:
    """One request of `caller`'s against its rate limit (the core holds every bucket)."""

    caller: str
    per_minute: float


@dataclass(frozen=True, slots=True)
class MetricsText:
    """The core's /metrics text, now."""


@dataclass(frozen=True, slots=True)
class LoadNow:
    """The core's /load figures, now (a snapshot may be a tenth of a second old)."""


Question = Submission | RateCheck | MetricsText | LoadNow
Answer = Admitted | Refused | ChatQueueError | bytes | LoadInfo | None


@dataclass(frozen=True, slots=True)
class Call:
    id: int
    what: Question


@dataclass(frozen=True, slots=True)
class Reply:
    id: int
    result: Answer


@dataclass(frozen=True, slots=True)
class Abandon:
    key: str  # the API server's name for the request (Submission.key)


@dataclass(frozen=True, slots=True)
class Events:
    """A step's events of an API server's requests. A request whose events are one plain Token
    (most of them, most steps) travels as (key, text, num_tokens): pickling a Token object cost
    both ends ~1.6 us each, the tuple's fields ~0.1 us."""

    entries: list[tuple[str, str, int] | tuple[str, list[Event]]]

    @classmethod
    def of(cls, batch: Batch) -> Events:
        entries: list[tuple[str, str, int] | tuple[str, list[Event]]] = []
        for key, events in batch:
            token = events[0] if len(events) == 1 else None
            if isinstance(token, Token) and not token.logprobs:
                entries.append((key, token.text, token.num_tokens))
            else:
                entries.append((key, events))
        return cls(entries)

    def batch(self) -> Batch:
        return [
            (e[0], [Token(e[1], e[2])]) if len(e) == 3 else (e[0], e[1])  # type: ignore[misc]
            for e in self.entries
        ]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The core's state as /health, /load and admission's checks read it."""

    health: str
    load: LoadInfo
    load_error: str | None = None
    last_model_exit: str | None = None
    unavailable: ServiceUnavailable | None = None
    description: Description | None = None  # once the model is ready (sent to each once)
    token_budget: TokenBudget | None = None
    engine_info: dict[str, Any] = field(default_factory=dict)

"""The typed messages between a front (the HTTP side, in another process) and the ChatQueue that
serves it: a cluster's replica (pickled by Ray, `chatqueue.cluster`) or the core process under
several API servers (`chatqueue.fronts`). The queue answers a submission with `Admitted` or
`Refused`; an admitted request's own events (Queued, Started, Token, Finished, as a ChatQueue
gives them) come on the front's channel (`outbox`), labelled with the submission's `key`."""

from __future__ import annotations

from dataclasses import dataclass

from chatqueue.errors import ChatQueueError
from chatqueue.text.tokenizer import Tokenizer
from chatqueue.types import ChatMessage, SamplingParams, ToolSpec


@dataclass(frozen=True, slots=True)
class Submission:
    """One request, as `ChatQueue.submit` (messages) or `submit_prompt` (prompt) takes it."""

    messages: tuple[ChatMessage, ...] | None = None
    prompt: str | tuple[int, ...] | None = None
    params: SamplingParams | None = None
    user: str = ""
    priority: int = 0
    queue_timeout_s: float | None = None
    max_queue_per_user: int | None = None
    cap_key: str | None = None
    tools: tuple[ToolSpec, ...] = ()  # offered to the model (messages only)
    front: str = ""  # the front that placed it: its channel carries the events
    key: str = ""  # the front's name for the request on that channel


@dataclass(frozen=True, slots=True)
class Admitted:
    replica: str  # the queue that took it (a replica's id; the core's under several fronts)
    request_id: str


@dataclass(frozen=True, slots=True)
class Refused:
    """Admission said no (full, shutting down, loading, a bad request): the front may try the
    next replica. The figures are the replica's own at that moment, for a cluster Retry-After."""

    replica: str
    error: ChatQueueError
    waiting: int
    drain_rate_per_s: float | None


@dataclass(frozen=True, slots=True)
class Description:
    """What the front needs of the model to serve the routes itself: names, the context window
    and the caps (the token budget), and the tokenizer (prompts are measured in the front)."""

    model_name: str
    context_window: int
    tokenizer: Tokenizer
    max_concurrent: int
    max_queue_size: int

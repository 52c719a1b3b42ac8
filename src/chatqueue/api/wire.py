"""The typed messages between a front (the HTTP side, in another process) and the ChatQueue that
serves it: a cluster's replica (pickled by Ray, `chatqueue.cluster`) or the core process under
several API servers (`chatqueue.fronts`). The queue answers a submission with `Admitted` or
`Refused`; an admitted request's own events (Queued, Started, Token, Finished, as a ChatQueue
gives them) come on the front's channel (`outbox`), labelled with the submission's `key`."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from chatqueue.api.chat_queue import Admission
from chatqueue.errors import ChatQueueError
from chatqueue.text.tokenizer import Tokenizer
from chatqueue.types import ChatMessage, SamplingParams, ToolSpec

if TYPE_CHECKING:
    from chatqueue.api.chat_queue import ChatQueue
    from chatqueue.api.stream import RequestStream


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

    @classmethod
    def of_chat(
        cls,
        messages: Sequence[ChatMessage],
        params: SamplingParams | None,
        tools: Sequence[ToolSpec],
        admission: Admission,
    ) -> Submission:
        a = admission
        return cls(
            tuple(messages), None, params, a.user, a.priority, a.queue_timeout_s,
            a.max_queue_per_user, a.cap_key, tuple(tools),
        )  # fmt: skip

    @classmethod
    def of_prompt(
        cls, prompt: str | Sequence[int], params: SamplingParams | None, admission: Admission
    ) -> Submission:
        a = admission
        text = prompt if isinstance(prompt, str) else tuple(prompt)
        return cls(
            None, text, params, a.user, a.priority, a.queue_timeout_s, a.max_queue_per_user,
            a.cap_key,
        )  # fmt: skip

    async def submit_to(self, cq: ChatQueue) -> RequestStream:
        """Admit it to `cq` (a replica's, the core's), as the front was asked."""
        submit: Callable[..., Awaitable[RequestStream]]
        if self.messages is not None:
            submit = functools.partial(cq.submit, self.messages, tools=self.tools)
        else:
            assert self.prompt is not None, "a submission has messages or a prompt"
            submit = functools.partial(cq.submit_prompt, self.prompt)
        return await submit(
            self.params,
            user=self.user,
            priority=self.priority,
            queue_timeout_s=self.queue_timeout_s,
            max_queue_per_user=self.max_queue_per_user,
            cap_key=self.cap_key,
        )


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

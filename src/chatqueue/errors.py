"""What went wrong, by kind. Small exception classes that say what happened (and, where it applies,
when to retry); they know no HTTP. The server maps each class to a status code in one table
(`server/errors.py`)."""

from __future__ import annotations

from typing import ClassVar


class ChatQueueError(Exception):
    """`kind` names what happened (the `type` of the error a client sees); `param` the request
    field at fault, if one is; `retry_after_s` when trying again may work."""

    kind: ClassVar[str] = "server_error"

    def __init__(
        self, message: str, *, param: str | None = None, retry_after_s: int | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple[object, ...]:
        # NOTE: errors cross processes (a cluster's replicas send them to the front); pickle's
        # default would call the class with `args` alone, which subclasses with keyword-only or
        # no parameters refuse.
        return (_rebuild, (type(self), self.message, dict(self.__dict__)))


def _rebuild(cls: type[ChatQueueError], message: str, state: dict[str, object]) -> ChatQueueError:
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.__dict__.update(state)
    return err


class InvalidRequest(ChatQueueError):
    kind = "invalid_request_error"


class PromptTooLong(InvalidRequest):
    def __init__(self, *, prompt_tokens: int, max_tokens: int, context_window: int) -> None:
        super().__init__(
            f"This model's context window is {context_window} tokens, but the request needs "
            f"{prompt_tokens + max_tokens} ({prompt_tokens} in the prompt + {max_tokens} for "
            "max_tokens). Shorten the messages or lower max_tokens.",
            param="messages",
        )
        self.prompt_tokens = prompt_tokens
        self.context_window = context_window


class NotFound(ChatQueueError):
    kind = "not_found"


class Unauthorized(ChatQueueError):
    kind = "authentication_error"


class Forbidden(ChatQueueError):
    """Refused whoever asks: e.g. a request another site's page made with the user's cookie."""

    kind = "forbidden"


class PayloadTooLarge(ChatQueueError):
    kind = "request_too_large"


class QueueFull(ChatQueueError):
    """Admission refused: running and waiting are at their bounds. Always says when to retry."""

    kind = "queue_full"

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message, retry_after_s=retry_after_s)


class UserQueueFull(QueueFull):
    kind = "user_queue_full"


class RateLimited(ChatQueueError):
    """The caller sent more requests a minute than its rate limit. Says when the next may go."""

    kind = "rate_limited"

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message, retry_after_s=retry_after_s)


class ServiceUnavailable(ChatQueueError):
    """The model cannot take requests now: it failed, or it does not answer."""

    kind = "service_unavailable"


class NotReady(ServiceUnavailable):
    kind = "loading"


class ShuttingDown(ServiceUnavailable):
    kind = "shutting_down"


class QueueTimeout(ServiceUnavailable):
    """The request waited past its queue deadline and never took a slot."""

    kind = "queue_timeout"


class StoreUnavailable(ServiceUnavailable):
    """The history store does not answer (Redis gone or frozen, a disk error): the chat routes
    cannot read or keep a conversation. The model still serves /v1."""

    kind = "history_unavailable"

    def __init__(
        self, message: str = "Conversation history is unavailable right now; try again shortly."
    ) -> None:
        super().__init__(message, retry_after_s=1)


class EngineError(ChatQueueError):
    """The model runner failed while this request was in its step."""

    kind = "engine_error"


class EngineRestarted(EngineError):
    """The model process died (or hung and was killed) while this request ran; it is being
    restarted, and the requests that were waiting will run once it is back."""

    kind = "engine_restarted"


class ReplicaLost(EngineError):
    """The cluster replica that held this request went away (its process died, or its node);
    the request is gone with it. New requests go to the other replicas."""

    kind = "replica_lost"

    def __init__(
        self, message: str = "The replica serving this request stopped. Retry the request."
    ) -> None:
        super().__init__(message, retry_after_s=1)


class CoreLost(EngineError):
    """Under several API servers (`--api-servers`), the core process that runs the queue and the
    model went away; the API server that held this request stops with it."""

    kind = "core_lost"

    def __init__(
        self, message: str = "The server's core process went away. Retry shortly."
    ) -> None:
        super().__init__(message, retry_after_s=1)


class Aborted(ChatQueueError):
    """The request ended before it finished, without an error of the server's: its reader left
    or fell too far behind."""

    kind = "server_error"  # NOTE: what clients have always seen for it

    def __init__(self, message: str = "The request was aborted before it finished.") -> None:
        super().__init__(message)


class ClientGone(ChatQueueError):
    """The client disconnected before the answer was ready: a finish reason, not a failure."""

    kind = "client_closed_request"

    def __init__(self) -> None:
        super().__init__("The client closed the connection before the answer was ready.")

"""Small exception classes that carry their HTTP status; one handler turns them into responses."""

from __future__ import annotations


class ChatQueueError(Exception):
    status_code: int = 500
    error_type: str = "server_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    @property
    def headers(self) -> dict[str, str]:
        return {}


class InvalidRequest(ChatQueueError):
    status_code = 400
    error_type = "invalid_request_error"


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
    status_code = 404
    error_type = "not_found"


class Unauthorized(ChatQueueError):
    status_code = 401
    error_type = "authentication_error"

    @property
    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class PayloadTooLarge(ChatQueueError):
    status_code = 413
    error_type = "request_too_large"


class QueueFull(ChatQueueError):
    """Admission refused: the waiting queue is at its bound. Carries a Retry-After in seconds."""

    status_code = 429
    error_type = "queue_full"

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class UserQueueFull(QueueFull):
    error_type = "user_queue_full"


class ServiceUnavailable(ChatQueueError):
    status_code = 503
    error_type = "service_unavailable"


class NotReady(ServiceUnavailable):
    error_type = "loading"


class ShuttingDown(ServiceUnavailable):
    error_type = "shutting_down"


class QueueTimeout(ServiceUnavailable):
    """The request waited past its queue deadline and never took a slot."""

    error_type = "queue_timeout"


class EngineError(ChatQueueError):
    """The model runner failed while this request was in its step."""

    status_code = 500
    error_type = "engine_error"

"""chatqueue: serve a language model as a streaming chat to many people at once."""

from chatqueue.api import FinishInfo, LoadInfo, RequestStream
from chatqueue.config import Settings
from chatqueue.engine.mock import MockConfig, MockRunner
from chatqueue.server.embedding import ChatQueue
from chatqueue.types import (
    ChatMessage,
    Event,
    Finished,
    FinishReason,
    Queued,
    SamplingParams,
    Started,
    Token,
    Usage,
)

__all__ = [
    "ChatMessage",
    "ChatQueue",
    "Event",
    "FinishInfo",
    "FinishReason",
    "Finished",
    "LoadInfo",
    "MockConfig",
    "MockRunner",
    "Queued",
    "RequestStream",
    "SamplingParams",
    "Settings",
    "Started",
    "Token",
    "Usage",
]

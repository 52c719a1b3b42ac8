"""chatqueue: serve a language model as a streaming chat to many people at once.

NOTE: the names below are imported when first used (PEP 562), not with the package: a model
process imports `chatqueue.engine...` and must not pay for the server's imports (FastAPI,
Starlette, pydantic models) before its own, which decide how soon a restart is ready.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

_WHERE = {
    "ChatMessage": "chatqueue.types",
    "ChatQueue": "chatqueue.server.embedding",
    "Event": "chatqueue.types",
    "FinishInfo": "chatqueue.api",
    "FinishReason": "chatqueue.types",
    "Finished": "chatqueue.types",
    "LoadInfo": "chatqueue.api",
    "MockConfig": "chatqueue.engine.mock",
    "MockRunner": "chatqueue.engine.mock",
    "Queued": "chatqueue.types",
    "RequestStream": "chatqueue.api",
    "SamplingParams": "chatqueue.types",
    "Settings": "chatqueue.config",
    "Started": "chatqueue.types",
    "Token": "chatqueue.types",
    "Usage": "chatqueue.types",
}

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


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'chatqueue' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])

"""The one interface every history store implements, and the factory that picks one."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from chatqueue.history.types import ChatParams, Feedback, Turn


class HistoryStore(Protocol):
    """Conversations by id, sampling parameters by session id, feedback by message id.

    Every method is a coroutine: a store may do I/O (a file, a network) but never blocks the
    event loop.
    """

    async def turns(self, conversation_id: str) -> list[Turn]:
        """The conversation's turns, oldest first; empty for one never seen."""
        ...

    async def append(self, conversation_id: str, turn: Turn) -> None: ...

    async def truncate(self, conversation_id: str, keep: int) -> None:
        """Keep only the first `keep` turns (regenerate drops the last reply)."""
        ...

    async def clear(self, conversation_id: str) -> None: ...

    async def params(self, session_id: str) -> ChatParams | None: ...

    async def set_params(self, session_id: str, params: ChatParams) -> None: ...

    async def add_feedback(self, feedback: Feedback) -> None:
        """Record feedback; a later one on the same message replaces it."""
        ...

    async def feedback(self, message_id: str) -> Feedback | None: ...

    async def close(self) -> None: ...


def open_store(history: str, data_dir: Path) -> HistoryStore:
    """`history` is Settings.history: sqlite (a file in `data_dir`), memory, or a redis URL."""
    if history == "memory":
        from chatqueue.history.memory import MemoryStore

        return MemoryStore()
    if history == "sqlite":
        from chatqueue.history.sqlite import SqliteStore

        return SqliteStore(data_dir / "history.sqlite3")
    from chatqueue.history.redis import RedisStore

    return RedisStore(history)

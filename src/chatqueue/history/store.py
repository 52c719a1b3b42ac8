"""The one interface every history store implements, and the factory that picks one."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from chatqueue.history.types import ChatParams, Feedback, Turn


class HistoryStore(Protocol):
    """Conversations by id, sampling parameters by session id, feedback by message id.

    Every method is a coroutine: a store may do I/O (a file, a network) but never blocks the
    event loop. A store that cannot be reached raises StoreUnavailable (chatqueue.errors).
    With a TTL, a conversation no write touched for that long is gone (its turns; parameters
    and feedback are kept).
    """

    async def turns(self, conversation_id: str) -> list[Turn]:
        """The conversation's turns, oldest first; empty for one never seen (or expired)."""
        ...

    async def append(self, conversation_id: str, *turns: Turn, keep: int | None = None) -> None:
        """Add `turns` at the end, all or none (one write). With `keep`, first drop all but the
        first `keep` turns, in the same write (regenerate replaces the last reply)."""
        ...

    async def update(self, conversation_id: str, turn: Turn) -> None:
        """Replace the turn with `turn.message_id` (a reply as it streams and when it ends);
        nothing if there is none (the conversation was cleared meanwhile)."""
        ...

    async def truncate(self, conversation_id: str, keep: int) -> None:
        """Keep only the first `keep` turns."""
        ...

    async def clear(self, conversation_id: str) -> None: ...

    async def delete(self, conversation_id: str) -> None:
        """The conversation and the feedback given on its replies."""
        ...

    async def params(self, session_id: str) -> ChatParams | None: ...

    async def set_params(self, session_id: str, params: ChatParams) -> None: ...

    async def add_feedback(self, feedback: Feedback) -> None:
        """Record feedback; a later one on the same message replaces it."""
        ...

    async def feedback(self, message_id: str) -> Feedback | None: ...

    async def is_available(self) -> bool:
        """Whether the store answers now (what /health reports); never raises."""
        ...

    async def close(self) -> None: ...


def open_store(history: str, data_dir: Path, *, ttl_s: int | None = None) -> HistoryStore:
    """`history` is Settings.history: sqlite (a file in `data_dir`), memory, or a redis URL;
    `ttl_s` Settings.history_ttl."""
    if history == "memory":
        from chatqueue.history.memory import MemoryStore

        return MemoryStore(ttl_s=ttl_s)
    if history == "sqlite":
        from chatqueue.history.sqlite import SqliteStore

        return SqliteStore(data_dir / "history.sqlite3", ttl_s=ttl_s)
    from chatqueue.history.redis import RedisStore

    return RedisStore(history, ttl_s=ttl_s)

"""History in this process's memory: gone on restart, not shared between processes."""

from __future__ import annotations

import time
from collections.abc import Callable

from chatqueue.history.types import ChatParams, Feedback, Turn


class MemoryStore:
    def __init__(
        self, *, ttl_s: float | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self._turns: dict[str, list[Turn]] = {}
        self._last_write: dict[str, float] = {}
        self._params: dict[str, ChatParams] = {}
        self._feedback: dict[str, Feedback] = {}
        self._ttl_s = ttl_s
        self._clock = clock
        self._next_sweep = 0.0

    def _live(self, conversation_id: str) -> list[Turn] | None:
        """The conversation's list, after dropping it if it expired."""
        if self._ttl_s is not None:
            now = self._clock()
            if now >= self._next_sweep:  # NOTE: a sweep at most every tenth of the TTL
                self._next_sweep = now + self._ttl_s / 10
                for cid in [c for c, t in self._last_write.items() if now - t > self._ttl_s]:
                    self._forget(cid)
            written = self._last_write.get(conversation_id)
            if written is not None and now - written > self._ttl_s:
                self._forget(conversation_id)
        return self._turns.get(conversation_id)

    def _forget(self, conversation_id: str) -> None:
        self._turns.pop(conversation_id, None)
        self._last_write.pop(conversation_id, None)

    def _touch(self, conversation_id: str) -> list[Turn]:
        self._last_write[conversation_id] = self._clock()
        return self._turns.setdefault(conversation_id, [])

    async def turns(self, conversation_id: str) -> list[Turn]:
        return list(self._live(conversation_id) or ())

    async def append(self, conversation_id: str, *turns: Turn, keep: int | None = None) -> None:
        self._live(conversation_id)
        kept = self._touch(conversation_id)
        if keep is not None:
            del kept[keep:]
        kept.extend(turns)

    async def update(self, conversation_id: str, turn: Turn) -> None:
        kept = self._live(conversation_id) or []
        for i, t in enumerate(kept):
            if t.message_id == turn.message_id:
                kept[i] = turn
                self._touch(conversation_id)
                return

    async def truncate(self, conversation_id: str, keep: int) -> None:
        kept = self._live(conversation_id)
        if kept is not None:
            del kept[keep:]

    async def clear(self, conversation_id: str) -> None:
        self._forget(conversation_id)

    async def delete(self, conversation_id: str) -> None:
        self._forget(conversation_id)
        for mid in [m for m, f in self._feedback.items() if f.conversation_id == conversation_id]:
            del self._feedback[mid]

    async def params(self, session_id: str) -> ChatParams | None:
        return self._params.get(session_id)

    async def set_params(self, session_id: str, params: ChatParams) -> None:
        self._params[session_id] = params

    async def add_feedback(self, feedback: Feedback) -> None:
        self._feedback[feedback.message_id] = feedback

    async def feedback(self, message_id: str) -> Feedback | None:
        return self._feedback.get(message_id)

    async def is_available(self) -> bool:
        return True

    async def close(self) -> None:
        pass

"""History in this process's memory: gone on restart, not shared between processes."""

from __future__ import annotations

from collections import defaultdict

from chatqueue.history.types import ChatParams, Feedback, Turn


class MemoryStore:
    def __init__(self) -> None:
        self._turns: defaultdict[str, list[Turn]] = defaultdict(list)
        self._params: dict[str, ChatParams] = {}
        self._feedback: dict[str, Feedback] = {}

    async def turns(self, conversation_id: str) -> list[Turn]:
        return list(self._turns.get(conversation_id, ()))

    async def append(self, conversation_id: str, turn: Turn) -> None:
        self._turns[conversation_id].append(turn)

    async def truncate(self, conversation_id: str, keep: int) -> None:
        if conversation_id in self._turns:
            del self._turns[conversation_id][keep:]

    async def clear(self, conversation_id: str) -> None:
        self._turns.pop(conversation_id, None)

    async def params(self, session_id: str) -> ChatParams | None:
        return self._params.get(session_id)

    async def set_params(self, session_id: str, params: ChatParams) -> None:
        self._params[session_id] = params

    async def add_feedback(self, feedback: Feedback) -> None:
        self._feedback[feedback.message_id] = feedback

    async def feedback(self, message_id: str) -> Feedback | None:
        return self._feedback.get(message_id)

    async def close(self) -> None:
        pass

"""History in Redis, for several server processes sharing conversations (redis-py's asyncio
client). Keys: `chatqueue:conversation:<id>` (a list of turns, oldest first),
`chatqueue:params:<session>`, `chatqueue:feedback:<message id>`."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from chatqueue.history.types import (
    ChatParams,
    Feedback,
    Turn,
    dump,
    load_feedback,
    load_params,
    load_turn,
)


class RedisStore:
    def __init__(self, url: str, *, prefix: str = "chatqueue") -> None:
        self.url = url
        self._prefix = prefix
        # Connects on first command, so a server starts even while Redis is not up yet.
        self._redis: Any = aioredis.from_url(url)

    def _key(self, kind: str, name: str) -> str:
        return f"{self._prefix}:{kind}:{name}"

    async def turns(self, conversation_id: str) -> list[Turn]:
        raw = await self._redis.lrange(self._key("conversation", conversation_id), 0, -1)
        return [load_turn(body) for body in raw]

    async def append(self, conversation_id: str, turn: Turn) -> None:
        await self._redis.rpush(self._key("conversation", conversation_id), dump(turn))

    async def truncate(self, conversation_id: str, keep: int) -> None:
        key = self._key("conversation", conversation_id)
        if keep <= 0:
            await self._redis.delete(key)
        else:
            await self._redis.ltrim(key, 0, keep - 1)

    async def clear(self, conversation_id: str) -> None:
        await self._redis.delete(self._key("conversation", conversation_id))

    async def params(self, session_id: str) -> ChatParams | None:
        raw = await self._redis.get(self._key("params", session_id))
        return load_params(raw) if raw else None

    async def set_params(self, session_id: str, params: ChatParams) -> None:
        await self._redis.set(self._key("params", session_id), dump(params))

    async def add_feedback(self, feedback: Feedback) -> None:
        await self._redis.set(self._key("feedback", feedback.message_id), dump(feedback))

    async def feedback(self, message_id: str) -> Feedback | None:
        raw = await self._redis.get(self._key("feedback", message_id))
        return load_feedback(raw) if raw else None

    async def close(self) -> None:
        await self._redis.aclose()

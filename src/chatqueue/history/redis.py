"""History in Redis, for several server processes sharing conversations (redis-py's asyncio
client). Keys: `chatqueue:conversation:<id>` (a list of turns, oldest first; with a TTL, it
expires that long after its last write), `chatqueue:params:<session>`,
`chatqueue:feedback:<message id>`, `chatqueue:conversation-feedback:<id>` (the message ids with
feedback, so that deleting a conversation deletes its feedback).

Redis unreachable or frozen: every call raises StoreUnavailable within about a second (the
timeouts below) instead of holding the request; the next call after Redis is back works.
Durability is Redis's: see the README (appendonly, appendfsync)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from chatqueue.errors import StoreUnavailable
from chatqueue.history.types import (
    ChatParams,
    Feedback,
    Turn,
    dump,
    load_feedback,
    load_params,
    load_turn,
)

# NOTE: a refused connection fails at once; a host that does not answer the connect, after
# 0.5 s; a Redis that accepts but does not answer (frozen, swapping), after 1 s. A connection
# found dead (Redis restarted since it was opened) is retried once at once, a timeout never, so
# no request waits on Redis more than about a second.
CONNECT_TIMEOUT_S = 0.5
COMMAND_TIMEOUT_S = 1.0

# Replace the turn whose message id is ARGV[1] with ARGV[2], newest first; renew the TTL ARGV[3].
_UPDATE = """
local turns = redis.call('LRANGE', KEYS[1], 0, -1)
for i = #turns, 1, -1 do
  if string.find(turns[i], ARGV[1], 1, true) then
    redis.call('LSET', KEYS[1], i - 1, ARGV[2])
    if tonumber(ARGV[3]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[3]) end
    return 1
  end
end
return 0
"""


@contextmanager
def _reachable() -> Iterator[None]:
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError) as exc:
        raise StoreUnavailable() from exc


class RedisStore:
    def __init__(self, url: str, *, prefix: str = "chatqueue", ttl_s: int | None = None) -> None:
        self.url = url
        self._prefix = prefix
        self._ttl_s = ttl_s
        # Connects on first command, so a server starts even while Redis is not up yet.
        self._redis: Any = aioredis.from_url(
            url,
            socket_connect_timeout=CONNECT_TIMEOUT_S,
            socket_timeout=COMMAND_TIMEOUT_S,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        self._update = self._redis.register_script(_UPDATE)

    def _key(self, kind: str, name: str) -> str:
        return f"{self._prefix}:{kind}:{name}"

    async def turns(self, conversation_id: str) -> list[Turn]:
        with _reachable():
            raw = await self._redis.lrange(self._key("conversation", conversation_id), 0, -1)
        return [load_turn(body) for body in raw]

    async def append(self, conversation_id: str, *turns: Turn, keep: int | None = None) -> None:
        key = self._key("conversation", conversation_id)
        with _reachable():
            async with self._redis.pipeline(transaction=True) as tx:
                if keep is not None and keep <= 0:
                    tx.delete(key)
                elif keep is not None:
                    tx.ltrim(key, 0, keep - 1)
                if turns:
                    tx.rpush(key, *(dump(t) for t in turns))
                if self._ttl_s is not None:
                    tx.expire(key, self._ttl_s)
                await tx.execute()

    async def update(self, conversation_id: str, turn: Turn) -> None:
        key = self._key("conversation", conversation_id)
        marker = f'"message_id":"{turn.message_id}"'  # as `dump` writes it
        with _reachable():
            await self._update(keys=[key], args=[marker, dump(turn), self._ttl_s or 0])

    async def truncate(self, conversation_id: str, keep: int) -> None:
        key = self._key("conversation", conversation_id)
        with _reachable():
            if keep <= 0:
                await self._redis.delete(key)
            else:
                await self._redis.ltrim(key, 0, keep - 1)

    async def clear(self, conversation_id: str) -> None:
        with _reachable():
            await self._redis.delete(self._key("conversation", conversation_id))

    async def delete(self, conversation_id: str) -> None:
        index = self._key("conversation-feedback", conversation_id)
        with _reachable():
            rated = await self._redis.smembers(index)
            keys = [self._key("feedback", m.decode()) for m in rated]
            await self._redis.delete(self._key("conversation", conversation_id), index, *keys)

    async def params(self, session_id: str) -> ChatParams | None:
        with _reachable():
            raw = await self._redis.get(self._key("params", session_id))
        return load_params(raw) if raw else None

    async def set_params(self, session_id: str, params: ChatParams) -> None:
        with _reachable():
            await self._redis.set(self._key("params", session_id), dump(params))

    async def add_feedback(self, feedback: Feedback) -> None:
        index = self._key("conversation-feedback", feedback.conversation_id)
        with _reachable():
            async with self._redis.pipeline(transaction=True) as tx:
                tx.set(self._key("feedback", feedback.message_id), dump(feedback))
                tx.sadd(index, feedback.message_id)
                await tx.execute()

    async def feedback(self, message_id: str) -> Feedback | None:
        with _reachable():
            raw = await self._redis.get(self._key("feedback", message_id))
        return load_feedback(raw) if raw else None

    async def is_available(self) -> bool:
        try:
            with _reachable():
                await self._redis.ping()
        except StoreUnavailable:
            return False
        return True

    async def close(self) -> None:
        await self._redis.aclose()

"""History in a SQLite file: survives restarts, and a kill -9; several processes on one host may
share it."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

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

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS turns (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS turns_by_conversation ON turns (conversation_id, seq);
CREATE TABLE IF NOT EXISTS conversations (
    conversation_id TEXT PRIMARY KEY,
    last_write REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS conversations_by_last_write ON conversations (last_write);
CREATE TABLE IF NOT EXISTS params (session_id TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS feedback (message_id TEXT PRIMARY KEY, body TEXT NOT NULL);
"""


# Files from before the conversations table: each conversation's last write is its newest turn.
_BACKFILL = """
INSERT OR IGNORE INTO conversations (conversation_id, last_write)
SELECT conversation_id, MAX(json_extract(body, '$.created_at')) FROM turns GROUP BY conversation_id
"""
_SCHEMA_VERSION = 1

_TOUCH = """
INSERT INTO conversations (conversation_id, last_write) VALUES (?, ?)
ON CONFLICT (conversation_id) DO UPDATE SET last_write = excluded.last_write
"""
_MOST_SWEEP_EVERY_S = 60.0

log = logging.getLogger(__name__)


class SqliteStore:
    """The stdlib driver, called on worker threads (`asyncio.to_thread`) so the event loop never
    waits on the disk. One connection, opened on first use, behind a lock. Writes are whole turns
    (a reply is written when admitted, about once a second while it streams, and at its end),
    never one per token.

    With `ttl_s`, a conversation whose last write is older is invisible at once and leaves the
    file at the next sweep (at most a minute later, on the next call)."""

    def __init__(
        self,
        path: Path,
        *,
        ttl_s: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self._ttl_s = ttl_s
        self._clock = clock
        self._next_sweep = 0.0
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return await asyncio.to_thread(self._locked, fn)
        except sqlite3.OperationalError as exc:  # disk full, I/O error, locked too long
            log.error("history database %s: %s", self.path, exc)
            raise StoreUnavailable() from exc

    def _locked(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            if self._db is None:
                self._db = self._connect()
            with self._db:  # one transaction: commit, or roll back on error
                self._sweep_if_due(self._db)
                return fn(self._db)

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # NOTE: conversations are private: the file is the owner's alone (SQLite gives its -wal
        # and -shm files the same mode), also when an older version made it world-readable.
        os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))
        os.chmod(self.path, 0o600)
        db = sqlite3.connect(self.path, check_same_thread=False, timeout=10)
        # NOTE: durability. WAL: a commit is appended to the -wal file, so a process killed at
        # any point (kill -9, OOM) leaves a database that opens with every committed turn in it
        # (an unfinished append is ignored on open), and server processes on the same file read
        # while one writes. synchronous=FULL: the log is fsynced at every commit, so a turn is on
        # disk before its `done` event is sent, even against a power cut or an OS crash (NORMAL
        # would be enough for a kill -9 alone). The cost is one fsync per write, and writes are
        # per turn, not per token.
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        with db:
            db.executescript(_SCHEMA)
            if db.execute("PRAGMA user_version").fetchone()[0] < _SCHEMA_VERSION:
                db.execute(_BACKFILL)
                db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
        return db

    def _cutoff(self) -> float | None:
        return None if self._ttl_s is None else self._clock() - self._ttl_s

    def _sweep_if_due(self, db: sqlite3.Connection) -> None:
        cutoff = self._cutoff()
        if cutoff is None or self._clock() < self._next_sweep:
            return
        assert self._ttl_s is not None
        self._next_sweep = self._clock() + min(self._ttl_s / 10, _MOST_SWEEP_EVERY_S)
        expired = "SELECT conversation_id FROM conversations WHERE last_write < ?"
        db.execute(f"DELETE FROM turns WHERE conversation_id IN ({expired})", (cutoff,))
        db.execute("DELETE FROM conversations WHERE last_write < ?", (cutoff,))

    def _touch(self, db: sqlite3.Connection, conversation_id: str) -> None:
        db.execute(_TOUCH, (conversation_id, self._clock()))

    async def turns(self, conversation_id: str) -> list[Turn]:
        def read(db: sqlite3.Connection) -> list[tuple[str]]:
            cutoff = self._cutoff()
            if (
                cutoff is not None
                and db.execute(
                    "SELECT 1 FROM conversations WHERE conversation_id = ? AND last_write < ?",
                    (conversation_id, cutoff),
                ).fetchone()
            ):
                return []  # expired; the next sweep removes it
            return db.execute(
                "SELECT body FROM turns WHERE conversation_id = ? ORDER BY seq", (conversation_id,)
            ).fetchall()

        return [load_turn(body) for (body,) in await self._run(read)]

    async def append(self, conversation_id: str, *turns: Turn, keep: int | None = None) -> None:
        def write(db: sqlite3.Connection) -> None:
            if keep is not None:
                _keep_first(db, conversation_id, keep)
            db.executemany(
                "INSERT INTO turns (conversation_id, body) VALUES (?, ?)",
                [(conversation_id, dump(t)) for t in turns],
            )
            self._touch(db, conversation_id)

        await self._run(write)

    async def update(self, conversation_id: str, turn: Turn) -> None:
        def write(db: sqlite3.Connection) -> None:
            found = db.execute(
                "UPDATE turns SET body = ? "
                "WHERE conversation_id = ? AND json_extract(body, '$.message_id') = ?",
                (dump(turn), conversation_id, turn.message_id),
            )
            if found.rowcount:
                self._touch(db, conversation_id)

        await self._run(write)

    async def truncate(self, conversation_id: str, keep: int) -> None:
        await self._run(lambda db: _keep_first(db, conversation_id, keep))

    async def clear(self, conversation_id: str) -> None:
        def write(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM turns WHERE conversation_id = ?", (conversation_id,))
            db.execute("DELETE FROM conversations WHERE conversation_id = ?", (conversation_id,))

        await self._run(write)

    async def delete(self, conversation_id: str) -> None:
        await self.clear(conversation_id)
        await self._run(
            lambda db: db.execute(
                "DELETE FROM feedback WHERE json_extract(body, '$.conversation_id') = ?",
                (conversation_id,),
            )
        )

    async def params(self, session_id: str) -> ChatParams | None:
        row = await self._run(
            lambda db: db.execute(
                "SELECT body FROM params WHERE session_id = ?", (session_id,)
            ).fetchone()
        )
        return load_params(row[0]) if row else None

    async def set_params(self, session_id: str, params: ChatParams) -> None:
        await self._run(
            lambda db: db.execute(
                "INSERT OR REPLACE INTO params (session_id, body) VALUES (?, ?)",
                (session_id, dump(params)),
            )
        )

    async def add_feedback(self, feedback: Feedback) -> None:
        await self._run(
            lambda db: db.execute(
                "INSERT OR REPLACE INTO feedback (message_id, body) VALUES (?, ?)",
                (feedback.message_id, dump(feedback)),
            )
        )

    async def feedback(self, message_id: str) -> Feedback | None:
        row = await self._run(
            lambda db: db.execute(
                "SELECT body FROM feedback WHERE message_id = ?", (message_id,)
            ).fetchone()
        )
        return load_feedback(row[0]) if row else None

    async def is_available(self) -> bool:
        try:
            await self._run(lambda db: db.execute("SELECT 1").fetchone())
        except StoreUnavailable:
            return False
        return True

    async def close(self) -> None:
        def close() -> None:
            with self._lock:
                if self._db is not None:
                    self._db.close()
                    self._db = None

        await asyncio.to_thread(close)


def _keep_first(db: sqlite3.Connection, conversation_id: str, keep: int) -> None:
    db.execute(
        "DELETE FROM turns WHERE conversation_id = ? AND seq NOT IN "
        "(SELECT seq FROM turns WHERE conversation_id = ? ORDER BY seq LIMIT ?)",
        (conversation_id, conversation_id, keep),
    )

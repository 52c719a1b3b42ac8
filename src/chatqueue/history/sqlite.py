"""History in a SQLite file: survives restarts; several processes on one host may share it."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

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
CREATE TABLE IF NOT EXISTS params (session_id TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS feedback (message_id TEXT PRIMARY KEY, body TEXT NOT NULL);
"""


class SqliteStore:
    """The stdlib driver, called on worker threads (`asyncio.to_thread`) so the event loop never
    waits on the disk. One connection, opened on first use, behind a lock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.to_thread(self._locked, fn)

    def _locked(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            if self._db is None:
                self._db = self._connect()
            with self._db:  # one transaction: commit, or roll back on error
                return fn(self._db)

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # NOTE: conversations are private: the file is the owner's alone (SQLite gives its -wal
        # and -shm files the same mode), also when an older version made it world-readable.
        os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))
        os.chmod(self.path, 0o600)
        db = sqlite3.connect(self.path, check_same_thread=False, timeout=10)
        # NOTE: WAL lets server processes on the same file read while one writes.
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(_SCHEMA)
        return db

    async def turns(self, conversation_id: str) -> list[Turn]:
        rows = await self._run(
            lambda db: db.execute(
                "SELECT body FROM turns WHERE conversation_id = ? ORDER BY seq", (conversation_id,)
            ).fetchall()
        )
        return [load_turn(body) for (body,) in rows]

    async def append(self, conversation_id: str, turn: Turn) -> None:
        await self._run(
            lambda db: db.execute(
                "INSERT INTO turns (conversation_id, body) VALUES (?, ?)",
                (conversation_id, dump(turn)),
            )
        )

    async def truncate(self, conversation_id: str, keep: int) -> None:
        await self._run(
            lambda db: db.execute(
                "DELETE FROM turns WHERE conversation_id = ? AND seq NOT IN "
                "(SELECT seq FROM turns WHERE conversation_id = ? ORDER BY seq LIMIT ?)",
                (conversation_id, conversation_id, keep),
            )
        )

    async def clear(self, conversation_id: str) -> None:
        await self._run(
            lambda db: db.execute("DELETE FROM turns WHERE conversation_id = ?", (conversation_id,))
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

    async def close(self) -> None:
        def close() -> None:
            with self._lock:
                if self._db is not None:
                    self._db.close()
                    self._db = None

        await asyncio.to_thread(close)

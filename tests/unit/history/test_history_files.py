"""Conversations on disk are their owner's alone."""

from __future__ import annotations

import stat
from pathlib import Path

from chatqueue.history.sqlite import SqliteStore
from chatqueue.history.types import Turn


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def modes_of(folder: Path, pattern: str) -> dict[str, int]:
    return {f.name: mode(f) for f in folder.glob(pattern)}


async def test_the_sqlite_files_are_readable_by_their_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    store = SqliteStore(path)
    try:
        await store.append("c1", Turn("user", "a secret"))
        modes = modes_of(tmp_path, "history.sqlite3*")
        assert path.name in modes and len(modes) >= 2  # the database and its write-ahead log
        assert modes == dict.fromkeys(modes, 0o600)
    finally:
        await store.close()


async def test_a_world_readable_file_from_before_is_made_private(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    path.touch(mode=0o644)
    path.chmod(0o644)
    store = SqliteStore(path)
    try:
        await store.append("c1", Turn("user", "hello"))
        assert mode(path) == 0o600
    finally:
        await store.close()


async def test_sqlite_commits_in_wal_mode_synced_in_full(tmp_path: Path) -> None:
    # NOTE: WAL keeps the file openable after a kill -9; synchronous=FULL fsyncs the log at
    # each commit, so a turn whose `done` was sent survives even a power cut.
    store = SqliteStore(tmp_path / "history.sqlite3")
    try:
        await store.append("c1", Turn("user", "hello"))
        pragmas = await store._run(
            lambda db: (
                db.execute("PRAGMA journal_mode").fetchone()[0],
                db.execute("PRAGMA synchronous").fetchone()[0],
            )
        )
        assert pragmas == ("wal", 2)  # 2: FULL
    finally:
        await store.close()

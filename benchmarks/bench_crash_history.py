"""History across crashes: `kill -9` a real server (mock engine, SQLite history, its own data
folder) while replies stream, again and again. After each kill the database must open (integrity
check), hold every reply whose `done` event a client received, exactly as received and not marked
interrupted, and no conversation may have two user turns in a row. Prints the counts.

    .venv/bin/python benchmarks/bench_crash_history.py --kills 50
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import sqlite3
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import TemporaryDirectory

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support.servers import running_server


@dataclass
class Seen:
    """What the clients received, over every run."""

    done: dict[str, str] = field(default_factory=dict)  # message id -> the reply's text
    conversations: dict[int, str] = field(default_factory=dict)  # client -> conversation id
    mid_reply: set[int] = field(default_factory=set)  # clients with a token and no done yet
    is_mid_reply: asyncio.Event = field(default_factory=asyncio.Event)  # mid_reply not empty


async def client_loop(n: int, url: str, seen: Seen, rng: random.Random) -> None:
    """One user: message after message in its own conversation, until the server dies."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        while True:
            words = " ".join(f"c{n}w{i}" for i in range(rng.randint(5, 400)))
            body: dict[str, object] = {"message": words}
            if n in seen.conversations:
                body["conversation_id"] = seen.conversations[n]
            text: list[str] = []
            async with c.stream("POST", "/chat", json=body) as res:
                res.raise_for_status()
                seen.conversations[n] = res.headers["X-Conversation-Id"]
                name = ""
                async for line in res.aiter_lines():
                    if line.startswith("event:"):
                        name = line[6:].strip()
                    elif line.startswith("data:") and name == "token":
                        text.append(json.loads(line[5:])["text"])
                        seen.mid_reply.add(n)
                        seen.is_mid_reply.set()
                    elif line.startswith("data:") and name == "done":
                        seen.done[json.loads(line[5:])["message_id"]] = "".join(text)
                        seen.mid_reply.discard(n)
                        if not seen.mid_reply:
                            seen.is_mid_reply.clear()


@dataclass
class Check:
    opened: bool
    done_found: int
    done_missing: int
    done_changed: int
    user_twice: int
    cut_kept: int
    cut_empty: int
    turns: int


def check(db_path: Path, seen: Seen) -> Check:
    db = sqlite3.connect(db_path)
    try:
        opened = db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = db.execute("SELECT conversation_id, body FROM turns ORDER BY seq").fetchall()
    finally:
        db.close()
    by_conversation: dict[str, list[dict[str, object]]] = {}
    for cid, body in rows:
        by_conversation.setdefault(cid, []).append(json.loads(body))
    stored = {t["message_id"]: t for turns in by_conversation.values() for t in turns}
    found = [stored[m] for m in seen.done if m in stored]
    changed = sum(
        1 for m, text in seen.done.items() if m in stored and
        (stored[m]["content"] != text or stored[m]["interrupted"])
    )  # fmt: skip
    user_twice = sum(
        1
        for turns in by_conversation.values()
        for a, b in itertools.pairwise(turns)
        if a["role"] == b["role"] == "user"
    )
    cut = [t for t in stored.values() if t["interrupted"]]
    return Check(
        opened=opened,
        done_found=len(found),
        done_missing=len(seen.done) - len(found),
        done_changed=changed,
        user_twice=user_twice,
        cut_kept=sum(1 for t in cut if t["content"]),
        cut_empty=sum(1 for t in cut if not t["content"]),
        turns=len(rows),
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--mock-delay", type=float, default=0.005)
    parser.add_argument("--seed", type=int, default=12)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    seen = Seen()
    failures: Counter[str] = Counter()
    client_ends: Counter[str] = Counter()
    started = time.monotonic()
    with TemporaryDirectory(prefix="crash-history-") as tmp:
        tmp_path = Path(tmp)
        data = tmp_path / "data"
        flags = ("--engine", "mock", "--mock-delay", str(args.mock_delay), "--data-dir", str(data))
        for kill in range(1, args.kills + 1):
            seen.mid_reply.clear()
            seen.is_mid_reply.clear()
            with running_server(*flags, tmp_path=tmp_path) as server:
                tasks = [
                    asyncio.create_task(client_loop(n, server.url, seen, rng))
                    for n in range(args.clients)
                ]
                await asyncio.sleep(rng.uniform(0.5, 3.0))
                await seen.is_mid_reply.wait()
                server.process.kill()  # SIGKILL, mid-reply
                server.process.wait(10)
                outcomes = await asyncio.gather(*tasks, return_exceptions=True)
                client_ends.update(type(o).__name__ for o in outcomes)
                (tmp_path / f"server-{server.url.rsplit(':', 1)[1]}.log").unlink()
            result = check(data / "history.sqlite3", seen)
            print(
                f"kill {kill:2}: opened={result.opened} done {result.done_found}/"
                f"{result.done_found + result.done_missing} changed={result.done_changed} "
                f"user-user={result.user_twice} cut kept={result.cut_kept} "
                f"empty={result.cut_empty} turns={result.turns}",
                flush=True,
            )
            failures["not opened"] += not result.opened
            failures["done missing"] += result.done_missing
            failures["done changed"] += result.done_changed
            failures["user-user"] += result.user_twice
    elapsed = time.monotonic() - started
    print(f"\n{args.kills} kill -9s in {elapsed:.0f} s, {args.clients} clients")
    print(f"database opened after every kill: {result.opened and failures['not opened'] == 0}")
    print(f"replies whose done was received: {len(seen.done)}, in the database as received: "
          f"{result.done_found - result.done_changed}, missing: {result.done_missing}")  # fmt: skip
    print(f"two user turns in a row: {result.user_twice}")
    print(f"replies cut by a kill, kept marked interrupted: {result.cut_kept} with text, "
          f"{result.cut_empty} cut before their first write; turns stored: {result.turns}")  # fmt: skip
    print(f"how the clients' streams ended at the kills: {dict(client_ends)}")
    bad = failures["not opened"] + failures["done missing"] + failures["done changed"]
    sys.exit(1 if bad or failures["user-user"] else 0)


if __name__ == "__main__":
    asyncio.run(main())

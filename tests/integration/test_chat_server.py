"""The chat product on a real `chatqueue serve`: SQLite history survives a restart, an
interrupted reply is kept and marked, two server processes share conversations through Redis."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.chat import chat, done_of
from tests.support.http import SAFETY_S
from tests.support.servers import redis_server, running_server

MOCK = ("--engine", "mock", "--mock-mode", "echo")


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


def history(client: httpx.Client) -> list[dict[str, object]]:
    res = client.get("/chat/history", timeout=SAFETY_S)
    assert res.status_code == 200, res.text
    messages: list[dict[str, object]] = res.json()["messages"]
    return messages


def test_sqlite_history_survives_a_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    args = (*MOCK, "--mock-delay", "0", "--data-dir", str(data))
    cookies = httpx.Cookies()
    with running_server(*args, tmp_path=tmp_path) as server:
        with httpx.Client(base_url=server.url, cookies=cookies) as c:
            chat(c, "remember me")
            before = history(c)
            cookies = c.cookies
        assert server.terminate() == 0
    assert (data / "history.sqlite3").exists()
    with (
        running_server(*args, tmp_path=tmp_path) as server,
        httpx.Client(base_url=server.url, cookies=cookies) as c,
    ):
        assert history(c) == before
        assert [m["content"] for m in before] == ["remember me", "remember me"]


def test_an_interrupted_reply_is_kept_and_marked(tmp_path: Path) -> None:
    words = [f"w{i}" for i in range(400)]  # at 0.05 s a word: long enough to leave in the middle
    args = (*MOCK, "--mock-delay", "0.05", "--history", "memory", "--data-dir", str(tmp_path))
    with (
        running_server(*args, tmp_path=tmp_path) as server,
        httpx.Client(base_url=server.url, timeout=SAFETY_S) as c,
    ):
        with c.stream("POST", "/chat", json={"message": " ".join(words)}) as res:
            assert res.status_code == 200
            message_id = res.headers["X-Message-Id"]
            for line in res.iter_lines():
                if line.startswith("data:") and "text" in json.loads(line[5:]):
                    break  # the first token came: hang up
        server.wait_idle()
        reply = history(c)[-1]
    assert reply["message_id"] == message_id
    assert reply["role"] == "assistant"
    assert reply["interrupted"] is True
    assert reply["finish_reason"] == "abort"
    kept = str(reply["content"]).split()
    assert kept and kept == words[: len(kept)] and len(kept) < len(words)


def test_two_servers_share_conversations_through_redis(tmp_path: Path, redis_url: str) -> None:
    args = (*MOCK, "--mock-delay", "0", "--history", redis_url)
    env = {"CHATQUEUE_SESSION_SECRET": "shared-by-both-processes"}
    with (
        running_server(*args, "--data-dir", str(tmp_path / "a"), tmp_path=tmp_path, env=env) as a,
        running_server(*args, "--data-dir", str(tmp_path / "b"), tmp_path=tmp_path, env=env) as b,
    ):
        with httpx.Client(base_url=a.url) as on_a:
            chat(on_a, "asked on a")
            cookies = on_a.cookies
        with httpx.Client(base_url=b.url, cookies=cookies) as on_b:
            chat(on_b, "asked on b")
            assert [m["content"] for m in history(on_b)] == [
                "asked on a",
                "asked on a",
                "asked on b",
                "asked on b",
            ]
        with httpx.Client(base_url=b.url) as stranger:
            assert history(stranger) == []


def test_a_server_killed_mid_reply_keeps_every_done_turn_and_the_cut_reply(
    tmp_path: Path,
) -> None:
    """kill -9 while a reply streams, three times: after each restart every reply whose `done`
    came is there, the cut one is kept as far as it got and marked, and turns alternate."""
    words = [f"w{i}" for i in range(2000)]
    args = (*MOCK, "--mock-delay", "0.02", "--data-dir", str(tmp_path / "data"))
    cid: dict[str, str] = {}
    done_ids = []
    for _ in range(3):
        with (
            running_server(*args, tmp_path=tmp_path) as server,
            httpx.Client(base_url=server.url, timeout=SAFETY_S) as c,
        ):
            done = done_of(chat(c, "answered in full", **cid))
            cid = {"conversation_id": done["conversation_id"]}
            done_ids.append(done["message_id"])
            body = {"message": " ".join(words), **cid}
            with c.stream("POST", "/chat", json=body) as res:
                tokens = (ln for ln in res.iter_lines() if ln.startswith("event: token"))
                for _ in zip(range(60), tokens, strict=False):
                    pass  # 60 tokens at >= 0.02 s each: past the first write of what streamed
                server.process.kill()
                server.process.wait(SAFETY_S)
    with (
        running_server(*args, tmp_path=tmp_path) as server,
        httpx.Client(base_url=server.url, timeout=SAFETY_S) as c,
    ):
        res = c.get("/chat/history", params=cid)
        messages = res.json()["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"] * 6
    done_replies = [m for m in messages if m["message_id"] in done_ids]
    assert [m["content"] for m in done_replies] == ["answered in full"] * 3
    assert not any(m["interrupted"] for m in done_replies)
    cut = messages[3::4]
    assert all(m["interrupted"] and m["finish_reason"] == "abort" for m in cut)
    for m in cut:
        kept = str(m["content"]).split()
        assert kept and kept == words[: len(kept)], m

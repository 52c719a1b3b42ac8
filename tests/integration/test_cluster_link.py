"""A front's own line to a replica (`cluster/link.py`), over real TCP on this machine, with a
replica's `place` stood in for: waves answered in order, a front without the cluster's secret
refused before anything of its is read, a line that breaks answers its waiting wave with
LineBroken (never a hang), and a broken line is not tried again at once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from chatqueue.api.wire import Admitted, Submission
from chatqueue.cluster import link
from chatqueue.cluster.link import Line, LineBroken, Lines, LinkServer
from chatqueue.cluster.wave import Wave, WaveAnswer
from chatqueue.types import ChatMessage

SAFETY_S = 30.0  # a net against hangs, never a measurement
SECRET = b"s" * 32


def wave(*keys: str) -> Wave:
    subs = tuple(Submission(messages=(ChatMessage("user", k),), front="f", key=k) for k in keys)
    return Wave("f", subs, slots_only=False)


class Replica:
    """Answers each wave by admitting all of it, and records what it was asked."""

    def __init__(self, name: str = "r1") -> None:
        self.name = name
        self.asked: list[tuple[tuple[str, ...], str]] = []
        self.hold = asyncio.Event()
        self.hold.set()
        self.was_asked = asyncio.Event()

    async def place(self, w: Wave, replica: str) -> WaveAnswer:
        self.asked.append((tuple(s.key for s in w.submissions), replica))
        self.was_asked.set()
        await self.hold.wait()
        outcomes = tuple(Admitted(self.name, f"id-{s.key}") for s in w.submissions)
        return WaveAnswer(self.name, outcomes, None)


@pytest.fixture
async def served() -> AsyncIterator[tuple[Replica, LinkServer, str]]:
    replica = Replica()
    server = LinkServer(SECRET, replica.place)
    address = await server.start("127.0.0.1")
    yield replica, server, address
    await server.close()


async def test_waves_on_a_line_are_answered_in_order(
    served: tuple[Replica, LinkServer, str],
) -> None:
    replica, _, address = served
    line = Line("r1", address, SECRET)
    answers = [
        await asyncio.wait_for(line.place(wave(f"{i}a", f"{i}b")), SAFETY_S) for i in range(3)
    ]
    line.close()
    assert [[o.request_id for o in a.outcomes] for a in answers] == [  # type: ignore[union-attr]
        [f"id-{i}a", f"id-{i}b"] for i in range(3)
    ]
    assert replica.asked == [((f"{i}a", f"{i}b"), "r1") for i in range(3)]


async def test_a_front_without_the_secret_is_refused_before_it_is_heard(
    served: tuple[Replica, LinkServer, str],
) -> None:
    replica, _, address = served
    line = Line("r1", address, b"x" * 32)
    with pytest.raises(LineBroken):
        await asyncio.wait_for(line.place(wave("a")), SAFETY_S)
    assert replica.asked == []
    # and the line now says so at once; a line with the secret still works
    with pytest.raises(LineBroken):
        await line.place(wave("b"))
    good = Line("r1", address, SECRET)
    assert (await asyncio.wait_for(good.place(wave("c")), SAFETY_S)).replica == "r1"
    good.close()
    assert replica.asked == [(("c",), "r1")]


async def test_a_line_that_breaks_while_a_wave_waits_answers_it_with_line_broken(
    served: tuple[Replica, LinkServer, str],
) -> None:
    replica, server, address = served
    line = Line("r1", address, SECRET)
    await asyncio.wait_for(line.place(wave("warm")), SAFETY_S)
    replica.hold.clear()  # the next wave is taken but not answered
    replica.was_asked.clear()
    waiting = asyncio.ensure_future(line.place(wave("held")))
    await asyncio.wait_for(replica.was_asked.wait(), SAFETY_S)
    await server.close()  # the replica's end goes (it died, say)
    with pytest.raises(LineBroken):
        await asyncio.wait_for(waiting, SAFETY_S)
    assert line.broken_at is not None


async def test_no_line_to_a_port_nobody_listens_on(unused_tcp_port: int) -> None:
    line = Line("r1", f"127.0.0.1:{unused_tcp_port}", SECRET)
    with pytest.raises(LineBroken):
        await asyncio.wait_for(line.place(wave("a")), SAFETY_S)


async def test_a_broken_line_waits_before_it_is_tried_again_unless_the_address_changes(
    served: tuple[Replica, LinkServer, str], unused_tcp_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, _, address = served
    lines = Lines(SECRET)
    assert lines.to("r1", "") is None  # published no line: Serve calls
    dead = lines.to("r1", f"127.0.0.1:{unused_tcp_port}")
    assert dead is not None
    with pytest.raises(LineBroken):
        await asyncio.wait_for(dead.place(wave("a")), SAFETY_S)
    assert lines.to("r1", f"127.0.0.1:{unused_tcp_port}") is None  # not yet again
    monkeypatch.setattr(link, "RETRY_AFTER_S", 0.0)
    again = lines.to("r1", f"127.0.0.1:{unused_tcp_port}")
    assert again is not None and again is not dead  # a new try once the wait is over
    monkeypatch.setattr(link, "RETRY_AFTER_S", 3600.0)
    with pytest.raises(LineBroken):
        await asyncio.wait_for(again.place(wave("b")), SAFETY_S)
    moved = lines.to("r1", address)  # restarted elsewhere: tried at once
    assert moved is not None
    assert (await asyncio.wait_for(moved.place(wave("c")), SAFETY_S)).replica == "r1"
    lines.close()


def test_a_replica_remembers_what_it_answered_by_front_and_key() -> None:
    taken = link.Remembered(size=2)
    first = Admitted("r1", "id-1")
    taken.put("f", "1", first)
    assert taken.get("f", "1") is first
    assert taken.get("g", "1") is None  # another front's key 1 is another request
    taken.put("f", "2", Admitted("r1", "id-2"))
    taken.put("f", "3", Admitted("r1", "id-3"))
    assert taken.get("f", "1") is None  # the oldest goes past the size

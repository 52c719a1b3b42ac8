"""The frames between an API server and the core: what goes in comes out, in order."""

from __future__ import annotations

import asyncio
import socket

from chatqueue.fronts import link
from chatqueue.types import Finished, FinishReason, Started, Token, TokenLogprob, Usage


def test_a_steps_events_come_out_as_they_went_in() -> None:
    logprob = TokenLogprob(7, "a", -0.5, (97,))
    batch = [
        ("1", [Token(" plain", 1)]),
        ("2", [Token(" two", 2)]),
        ("3", [Token(" with logprobs", 1, (logprob,))]),
        ("4", [Started(0.25), Token(" first", 1)]),
        ("5", [Token(" last", 1), Finished(FinishReason.STOP, Usage(3, 4), text="x")]),
    ]
    events = link.Events.of(batch)
    assert [len(e) for e in events.entries] == [3, 3, 2, 2, 2]  # plain tokens as tuples
    assert events.batch() == batch


async def test_frames_cross_a_socket_whole_and_in_order() -> None:
    ours, theirs = socket.socketpair()
    reader, their_writer = await asyncio.open_unix_connection(sock=theirs)
    _, writer = await asyncio.open_unix_connection(sock=ours)
    sent = [link.Abandon("a"), link.Call(1, link.RateCheck("k", 6.0)), link.Reply(1, None)]
    for message in sent:
        link.write(writer, message)
    got = [await asyncio.wait_for(link.read(reader), 10) for _ in sent]
    writer.close()
    their_writer.close()
    assert got == sent

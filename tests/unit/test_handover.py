"""The engine's hand-over: events sent from another thread reach each stream on the event loop in
order, a stream's events of several steps together, at most DELIVERY_SLICE streams an iteration."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

from chatqueue.engine.handover import DELIVERY_SLICE, HandOver
from chatqueue.types import Event, Finished, FinishReason, Started, Token, Usage


@dataclass(eq=False)
class Sink:
    events: list[Event] = field(default_factory=list)
    got: asyncio.Event = field(default_factory=asyncio.Event)

    def push(self, event: Event) -> None:
        self.events.append(event)
        self.got.set()


@dataclass(eq=False)
class Seq:
    sink: Sink = field(default_factory=Sink)


def finished() -> Finished:
    return Finished(FinishReason.STOP, Usage(1, 2))


def send_from_thread(handover: HandOver, *outboxes: list[tuple[Seq, Event]]) -> None:
    thread = threading.Thread(target=lambda: [handover.send(o) for o in outboxes])  # type: ignore[arg-type]
    thread.start()
    thread.join()


async def test_steps_queued_before_the_loop_runs_reach_each_stream_in_order() -> None:
    done: list[Seq] = []
    handover = HandOver(on_finished=lambda seq, _: done.append(seq))  # type: ignore[arg-type]
    handover.bind(asyncio.get_running_loop())
    a, b = Seq(), Seq()
    end = finished()
    send_from_thread(
        handover,
        [(a, Started(0.0)), (b, Started(0.0))],
        [(a, Token("x")), (b, Token("y"))],
        [(a, Token("z")), (a, end)],
    )
    await a.sink.got.wait()  # one drain hands a stream every step's events at once
    assert a.sink.events == [Started(0.0), Token("x"), Token("z"), end]
    assert b.sink.events == [Started(0.0), Token("y")]
    assert done == [a]


async def test_one_loop_iteration_hands_over_at_most_a_slice_of_streams() -> None:
    handover = HandOver()
    handover.bind(asyncio.get_running_loop())
    seqs = [Seq() for _ in range(DELIVERY_SLICE + 5)]
    send_from_thread(handover, [(s, Token("t")) for s in seqs])
    await seqs[0].sink.got.wait()  # resumed before the next iteration's drain
    assert sum(bool(s.sink.events) for s in seqs) == DELIVERY_SLICE
    await seqs[-1].sink.got.wait()
    assert all(s.sink.events == [Token("t")] for s in seqs)


async def test_deliver_on_the_loop_comes_after_what_the_stream_has_queued() -> None:
    handover = HandOver()
    handover.bind(asyncio.get_running_loop())
    seq = Seq()
    end = finished()
    send_from_thread(handover, [(seq, Token("queued"))])
    handover.deliver([(seq, end)])  # type: ignore[list-item]
    assert seq.sink.events == [Token("queued"), end]
    await asyncio.sleep(0)  # one iteration: the drain the send scheduled finds nothing left
    assert seq.sink.events == [Token("queued"), end]

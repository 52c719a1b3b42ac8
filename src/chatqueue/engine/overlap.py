"""Whether the engine keeps a step in flight (`--overlap-steps`): on, off, or auto, from what the
steps measure.

NOTE: why auto. A step in flight hides the server's turnaround between a step's output and the
next step (detokenizing, stops, the hand-over, scheduling) behind the model's next step: worth a
quarter of the tokens/s at 256 streams on an H100, where that turnaround is about as long as the
step (benchmarks/RESULTS.md, issue 14). It costs a request that arrives mid-step one step more
before it starts, since the step after is already sent. Where the turnaround is a sliver of the
step (llama.cpp on a CPU: well under 1 ms of a 20-60 ms step) nothing is gained, and that step
more showed in the time to first token (128 against 105 ms at 8 streams). So auto keeps a step in
flight while the time the model waits between steps is at least ON_SHARE of the interval between
its outputs, and stops below OFF_SHARE.

What the model waits for is the server's turnaround and the hand-over of the step and its output
between the two processes (pickling, the socket, waking the other side), the round trip less the
time the model process reports for the step itself. On a 2-vCPU AMD EPYC at one stream of llama.cpp
the two came to 5-6% of the interval in-process and more under load (the turnaround alone 2%),
and a step in flight gave 0.96 of llama-server's tokens/s against 0.89 (RESULTS.md, issue 17);
at 8 and 32 streams there they were 1% of the step, and the step in flight stays off.
"""

from __future__ import annotations

from typing import Literal

OverlapMode = Literal["auto", "on", "off"]

ON_SHARE = 0.05
OFF_SHARE = 0.03
MIN_SAMPLES = 8  # steps measured before auto decides
ALPHA = 0.2  # weight of the newest step in the moving averages


class StepOverlap:
    def __init__(self, mode: OverlapMode) -> None:
        self.mode = mode
        self._is_on = mode == "on"
        self._turnaround: float | None = None  # moving averages, seconds
        self._hand_over: float | None = None  # measured on steps with none beside them
        self._interval: float | None = None
        self._samples = 0
        self._last_output: float | None = None
        self._awaits_send = False  # an output came and no step was sent since

    @property
    def is_on(self) -> bool:
        return self._is_on

    def note_output(self, now: float) -> None:
        """The model answered a step."""
        if self._last_output is not None:
            self._interval = _average(self._interval, now - self._last_output)
        self._last_output = now
        self._awaits_send = True

    def note_hand_over(self, seconds: float) -> None:
        """A step with nothing beside it: its round trip less the model's own time for it."""
        self._hand_over = _average(self._hand_over, max(0.0, seconds))

    @property
    def _waited(self) -> float | None:
        """What the model waits for between steps, one step at a time."""
        if self._turnaround is None:
            return None
        return self._turnaround + (self._hand_over or 0.0)

    def note_sent(self, now: float) -> None:
        """A step was sent (measured from the last output if none was sent since)."""
        if self._awaits_send and self._last_output is not None:
            self._turnaround = _average(self._turnaround, now - self._last_output)
            self._samples += 1
            self._decide()
        self._awaits_send = False

    def note_idle(self) -> None:
        """The engine waited for work: what follows is not a step's turnaround."""
        self._last_output = None
        self._awaits_send = False

    def describe(self) -> str:
        """Why it is on or off, for the log."""
        if self.mode != "auto":
            return f"--overlap-steps {self.mode}"
        waited = self._waited
        if waited is None or not self._interval or self._samples < MIN_SAMPLES:
            return "auto, not measured yet"
        assert self._turnaround is not None
        share = waited / self._interval
        return (
            f"auto: the model waits {waited * 1e3:.2f} ms between steps (the server's turnaround "
            f"{self._turnaround * 1e3:.2f} ms, the hand-over between the processes "
            f"{(self._hand_over or 0.0) * 1e3:.2f} ms), {share:.0%} of the "
            f"{self._interval * 1e3:.2f} ms between its outputs"
        )

    def _decide(self) -> None:
        waited = self._waited
        if self.mode != "auto" or self._samples < MIN_SAMPLES or waited is None:
            return
        if not self._interval:
            return
        share = waited / self._interval
        self._is_on = share >= (OFF_SHARE if self._is_on else ON_SHARE)


def _average(old: float | None, new: float) -> float:
    return new if old is None else old + ALPHA * (new - old)

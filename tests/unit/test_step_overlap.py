"""`--overlap-steps auto`: a step stays in flight while the server's turnaround between a step's
output and the next step is a fair share of the model's step, and not where it is a sliver."""

from __future__ import annotations

from chatqueue.engine.overlap import MIN_SAMPLES, StepOverlap

CLOCK = {"now": 0.0}


def steps(policy: StepOverlap, *, step_s: float, turnaround_s: float, n: int) -> None:
    """`n` steps one after the other: the model's output, then the next step sent."""
    for _ in range(n):
        CLOCK["now"] += step_s
        policy.note_output(CLOCK["now"])
        CLOCK["now"] += turnaround_s
        policy.note_sent(CLOCK["now"])


def test_auto_overlaps_where_the_turnaround_is_a_fair_share_of_the_step() -> None:
    policy = StepOverlap("auto")
    assert not policy.is_on  # nothing measured yet: one step at a time
    steps(policy, step_s=0.003, turnaround_s=0.003, n=MIN_SAMPLES - 1)
    assert not policy.is_on
    steps(policy, step_s=0.003, turnaround_s=0.003, n=2)
    assert policy.is_on


def test_auto_does_not_overlap_where_the_turnaround_is_a_sliver() -> None:
    policy = StepOverlap("auto")
    steps(policy, step_s=0.060, turnaround_s=0.0005, n=50)  # llama.cpp on a CPU
    assert not policy.is_on


def test_auto_turns_off_when_steps_grow_and_back_on_when_they_shrink() -> None:
    policy = StepOverlap("auto")
    steps(policy, step_s=0.004, turnaround_s=0.002, n=20)
    assert policy.is_on
    steps(policy, step_s=0.100, turnaround_s=0.002, n=40)
    assert not policy.is_on
    steps(policy, step_s=0.004, turnaround_s=0.002, n=40)
    assert policy.is_on


def test_a_wait_for_work_is_not_counted_as_turnaround() -> None:
    policy = StepOverlap("auto")
    now = 0.0
    for _ in range(50):
        now += 0.060
        policy.note_output(now)
        policy.note_idle()  # the queue ran dry: the engine waited
        now += 5.0
        policy.note_sent(now)
    assert not policy.is_on


def test_on_and_off_are_fixed() -> None:
    on, off = StepOverlap("on"), StepOverlap("off")
    for policy in (on, off):
        steps(policy, step_s=0.060, turnaround_s=0.060, n=20)
    assert on.is_on and not off.is_on

"""`--overlap-steps auto`: a step stays in flight while what the model waits for between steps (the
server's turnaround, the hand-over between the processes) is a fair share of the model's step,
and not where it is a sliver."""

from __future__ import annotations

from chatqueue.engine.overlap import MIN_SAMPLES, StepOverlap

CLOCK = {"now": 0.0}


def steps(
    policy: StepOverlap, *, step_s: float, turnaround_s: float, n: int, hand_over_s: float = 0.0
) -> None:
    """`n` steps one after the other: the model's output, then the next step sent; each step's
    round trip `hand_over_s` longer than the model's own time for it."""
    for _ in range(n):
        CLOCK["now"] += step_s + hand_over_s
        if hand_over_s:
            policy.note_hand_over(hand_over_s)
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


def test_the_hand_over_between_the_processes_counts_with_the_turnaround() -> None:
    """One llama.cpp stream on a 2-vCPU EPYC: a turnaround of 0.2 ms (2%) alone keeps it off;
    with the round trip's 0.4 ms besides, the model waits 5% of the time: on."""
    alone, with_hand_over = StepOverlap("auto"), StepOverlap("auto")
    steps(alone, step_s=0.0110, turnaround_s=0.0002, n=50)
    steps(with_hand_over, step_s=0.0110, turnaround_s=0.0002, n=50, hand_over_s=0.0004)
    assert not alone.is_on
    assert with_hand_over.is_on
    assert "hand-over between the processes 0.40 ms" in with_hand_over.describe()


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

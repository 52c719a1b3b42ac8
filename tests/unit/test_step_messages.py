"""What crosses to the model process each step survives pickling whole (its own __reduce__)."""

from __future__ import annotations

import dataclasses
import pickle

from chatqueue.engine.process.messages import StepDone
from chatqueue.engine.runner import NewSequence, SampledLogprobs, StepBatch, StepOutput
from chatqueue.types import SamplingParams


def round_trip(obj: object) -> object:
    return pickle.loads(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def test_a_step_batch_comes_back_equal_with_every_field() -> None:
    batch = StepBatch(
        new=[NewSequence(3, [1, 2], SamplingParams(max_tokens=5), block_table=(7,))],
        running=[1, 2],
        released=[9],
        grown={1: (4, 5)},
        masks={2: b"\x01\x02"},
    )
    assert len(batch.__reduce__()[1]) == len(dataclasses.fields(StepBatch))
    assert round_trip(batch) == batch


def test_a_step_output_comes_back_equal_with_every_field() -> None:
    output = StepOutput(
        {1: 42}, {1: SampledLogprobs(-0.5, (42, 7), (-0.5, -1.0))}, busy_s=0.01, cached={3: 64}
    )
    assert len(output.__reduce__()[1]) == len(dataclasses.fields(StepOutput))
    assert round_trip(output) == output
    assert round_trip(StepDone(output)) == StepDone(output)

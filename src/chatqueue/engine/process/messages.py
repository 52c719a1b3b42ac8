"""What crosses the socket between the server (ProcessRunner) and the model process (child).

server -> child: `Preload` at once, `Load` once (a spare child waits for it), then a `StepBatch`
a step, then `Close`.
child -> server: `Ready` or `LoadFailed` once, then `StepDone` or `StepFailed` for each step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from chatqueue.engine.runner import KVSpec, ModelRunner, StepOutput


@dataclass(frozen=True, slots=True)
class Preload:
    """Import these modules now (the slow part of a start), run `prepare` (what can be made
    ready before the model is loaded: the GPU's context, the compiler's imports), then wait for
    `Load`."""

    modules: tuple[str, ...] = ()
    prepare: Callable[[], None] | None = None
    # NOTE: run on a thread beside the imports (the GPU's context: time spent outside Python,
    # which imports need not wait for); `prepare` runs once both are done
    beside: Callable[[], None] | None = None


@dataclass(frozen=True, slots=True)
class Load:
    """Build the model: `load` is picklable (a module-level function, or a functools.partial
    of one)."""

    load: Callable[[], ModelRunner]
    log_level: str = "info"


@dataclass(frozen=True, slots=True)
class Close:
    """Free the model and exit."""


@dataclass(frozen=True, slots=True)
class Ready:
    context_window: int
    info: dict[str, Any] = field(default_factory=dict)  # the runner's choices (runner_info)
    kv_spec: KVSpec | None = None


@dataclass(frozen=True, slots=True)
class LoadFailed:
    reason: str


@dataclass(frozen=True, slots=True)
class StepDone:
    output: StepOutput

    def __reduce__(self) -> tuple[type[StepDone], tuple[StepOutput]]:
        return StepDone, (self.output,)  # as StepBatch's


@dataclass(frozen=True, slots=True)
class StepFailed:
    """The step raised; the model is still usable (as when a step raises in-process)."""

    reason: str


LoadReply = Ready | LoadFailed
StepReply = StepDone | StepFailed

"""The contract between the engine loop and a model: runners see batches, never single requests."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from chatqueue.types import ChatMessage, SamplingParams


@runtime_checkable
class Tokenizer(Protocol):
    """What the engine needs of a tokenizer. Encoding runs on a tokenizer thread, decoding on the
    engine thread; an implementation must allow both at once (HF runners keep two instances)."""

    @property
    def eos_token_ids(self) -> frozenset[int]: ...

    def apply_chat_template(self, messages: Sequence[ChatMessage]) -> list[int]:
        """The prompt token ids for a conversation, ending where the assistant's reply begins."""
        ...

    def decode(self, token_ids: Sequence[int]) -> str: ...


@dataclass(frozen=True, slots=True)
class NewSequence:
    """A request admitted this step: the runner prefills it and samples its first token."""

    seq_id: int
    prompt_ids: Sequence[int]
    params: SamplingParams


@dataclass(frozen=True, slots=True)
class StepBatch:
    """One step of work. `released` are freed first (finished or aborted since the last step), then
    `new` are prefilled and `running` decode one token each, together where the runner can."""

    new: Sequence[NewSequence]
    running: Sequence[int]
    released: Sequence[int]

    @property
    def is_empty(self) -> bool:
        return not self.new and not self.running


class RunnerLost(Exception):
    """Raised by `Runner.step` when the runner can take no further step (its process died). The
    engine fails every request it holds, reports itself failed and stops."""


@runtime_checkable
class Runner(Protocol):
    """A model behind the engine loop. Every method but `tokenizer` runs on the engine thread."""

    @property
    def model_name(self) -> str: ...

    @property
    def tokenizer(self) -> Tokenizer: ...

    @property
    def context_window(self) -> int:
        """Most tokens (prompt + completion) one sequence may hold."""
        ...

    def step(self, batch: StepBatch) -> dict[int, int]:
        """Advance the batch one token. Returns seq_id -> the token sampled for it. A sequence still
        prefilling in chunks may be missing; every other sequence in the batch must be present."""
        ...

    def close(self) -> None:
        """Free the model's memory. Called once, on the engine thread, when the worker stops."""
        ...

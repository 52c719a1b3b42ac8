"""One request as the engine holds it: the scheduler's record, its generation (tokens, text, when it
must end) and where its events go. One object from admission to the last event."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Protocol

from chatqueue.errors import ChatQueueError
from chatqueue.scheduler import Request
from chatqueue.text.detokenizer import IncrementalDetokenizer
from chatqueue.text.stops import StopStrings
from chatqueue.text.tokenizer import Tokenizer
from chatqueue.types import Event, Finished, FinishReason, SamplingParams, Usage


class EventSink(Protocol):
    """The caller's end of a request (api's RequestStream); `push` runs on the event loop."""

    def push(self, event: Event) -> None: ...


@dataclass(frozen=True, slots=True)
class Step:
    """What one new token did: the text to stream (maybe empty) and the finish, if it ended."""

    text: str
    finish: FinishReason | None = None


@dataclass(eq=False, slots=True, kw_only=True)
class Sequence(Request):
    prompt_ids: Seq[int]
    params: SamplingParams
    max_new_tokens: int
    tokenizer: Tokenizer
    sink: EventSink
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    # where the engine stands with it
    last_position: int | None = None  # the queue position its client was last told
    first_token_at: float | None = None
    abort_error: ChatQueueError | None = None  # why the server cut it short; None: client left
    is_failed: bool = False  # told of an error while its step was still running (a hang)
    _detok: IncrementalDetokenizer = field(init=False)
    _stops: StopStrings = field(init=False)

    def __post_init__(self) -> None:
        assert self.max_new_tokens >= 1
        self._detok = IncrementalDetokenizer(self.tokenizer)
        self._stops = StopStrings(self.params.stop)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_ids)

    def append(self, token_id: int) -> Step:
        if not self.params.ignore_eos and token_id in self.tokenizer.eos_token_ids:
            return self._emit(self._flush(), FinishReason.STOP)
        self.output_ids.append(token_id)
        text, stopped = self._stops.push(self._detok.push(token_id))
        if stopped:
            return self._emit(text, FinishReason.STOP)
        if len(self.output_ids) >= self.max_new_tokens:
            return self._emit(text + self._flush(), FinishReason.LENGTH)
        return self._emit(text, None)

    def finished(self, reason: FinishReason, error: ChatQueueError | None = None) -> Finished:
        usage = Usage(self.num_prompt_tokens, self.num_output_tokens)
        return Finished(reason, usage, self.text, error)

    def _flush(self) -> str:
        text, stopped = self._stops.push(self._detok.flush())
        return text if stopped else text + self._stops.flush()

    def _emit(self, text: str, finish: FinishReason | None) -> Step:
        self.text += text
        return Step(text, finish)

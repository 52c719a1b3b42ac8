"""One request as the engine holds it: the scheduler's record, its generation (tokens, text, when it
must end) and where its events go. One object from admission to the last event."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from chatqueue.engine.runner import SampledLogprobs
from chatqueue.errors import ChatQueueError, EngineError
from chatqueue.scheduler import Request
from chatqueue.text.detokenizer import IncrementalDetokenizer
from chatqueue.text.grammar import GrammarMatcher
from chatqueue.text.stops import StopStrings
from chatqueue.text.tokenizer import Tokenizer
from chatqueue.types import (
    Event,
    Finished,
    FinishReason,
    SamplingParams,
    Token,
    TokenLogprob,
    TopLogprob,
    Usage,
)


class EventSink(Protocol):
    """The caller's end of a request (api's RequestStream); `push` runs on the event loop."""

    def push(self, event: Event) -> None: ...


@dataclass(slots=True)
class Step:
    """What one new token did: the text to stream (maybe empty), the finish, if it ended, and
    the logprobs not streamed yet (a token's text may come out a few tokens later).

    NOTE: not frozen: a frozen dataclass's __init__ sets each field through object.__setattr__,
    3.4x the time of a plain one (0.52 against 0.15 us), and the engine makes one a token a
    stream. Nothing keeps a Step past the step that made it."""

    text: str
    finish: FinishReason | None = None
    logprobs: tuple[TokenLogprob, ...] = ()
    error: ChatQueueError | None = None  # why it ended with ERROR


@dataclass(eq=False, slots=True, kw_only=True)
class Sequence(Request):
    params: SamplingParams
    max_new_tokens: int
    tokenizer: Tokenizer
    sink: EventSink
    text: str = ""
    # where the engine stands with it
    last_position: int | None = None  # the queue position its client was last told
    first_token_at: float | None = None
    abort_error: ChatQueueError | None = None  # why the server cut it short; None: client left
    is_failed: bool = False  # told of an error while its step was still running (a hang)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # every output token's, if asked
    grammar: GrammarMatcher | None = None  # structured output: where the reply stands in it
    _num_logprobs_sent: int = 0
    # what `streamed` holds back (a stream interval above 1): text, logprobs, tokens
    _held_text: str = ""
    _held_logprobs: tuple[TokenLogprob, ...] = ()
    _num_held: int = 0
    _detok: IncrementalDetokenizer = field(init=False)
    _stops: StopStrings | None = field(init=False)  # None: no stop strings
    _eos: frozenset[int] = field(init=False)  # the ids that end it (none with ignore_eos)

    def __post_init__(self) -> None:
        assert self.max_new_tokens >= 1
        self._detok = IncrementalDetokenizer(self.tokenizer)
        self._stops = StopStrings(self.params.stop) if any(self.params.stop) else None
        self._eos = frozenset() if self.params.ignore_eos else self.tokenizer.eos_token_ids

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_ids)

    def mask(self) -> bytes | None:
        """The tokens its grammar allows next (None: unconstrained)."""
        return None if self.grammar is None else self.grammar.mask()

    def append(self, token_id: int, sampled: SampledLogprobs | None = None) -> Step:
        if token_id in self._eos:
            return self._emit(self._flush(), FinishReason.STOP)
        if self.grammar is not None and not self.grammar.advance(token_id):
            # the runner did not honour the step's mask
            error = EngineError(
                f"The model produced a token its grammar forbids: {self.grammar.error}"
            )
            return Step("", FinishReason.ERROR, error=error)
        self.output_ids.append(token_id)
        if sampled is not None:
            self.logprobs.append(self._token_logprob(token_id, sampled))
        text = self._detok.push(token_id)
        if self._stops is not None:
            text, stopped = self._stops.push(text)
            if stopped:
                return self._emit(text, FinishReason.STOP)
        if len(self.output_ids) >= self.max_new_tokens:
            return self._emit(text + self._flush(), FinishReason.LENGTH)
        return self._emit(text, None)

    def streamed(self, step: Step, interval: int = 1) -> Token | None:
        """What to stream after `step`: a Token of the text held back so far and this step's,
        or None. With `interval` above 1 the text goes out every `interval` tokens; the first
        token and the last never wait."""
        if interval == 1:  # nothing is ever held
            return Token(step.text, 1, step.logprobs) if step.text or step.logprobs else None
        text, logprobs = self._held_text + step.text, self._held_logprobs + step.logprobs
        self._num_held += 1
        if step.finish is None and self.num_output_tokens > 1 and self._num_held < interval:
            self._held_text, self._held_logprobs = text, logprobs
            return None
        num_tokens, self._num_held = self._num_held, 0
        self._held_text, self._held_logprobs = "", ()
        return Token(text, num_tokens, logprobs) if text or logprobs else None

    def finished(self, reason: FinishReason, error: ChatQueueError | None = None) -> Finished:
        usage = Usage(self.num_prompt_tokens, self.num_output_tokens, self.num_cached_tokens)
        return Finished(reason, usage, self.text, error, tuple(self.logprobs))

    def _token_logprob(self, token_id: int, sampled: SampledLogprobs) -> TokenLogprob:
        top = tuple(
            TopLogprob(piece, lp, raw)
            for i, lp in zip(sampled.top_ids, sampled.top_logprobs, strict=True)
            for piece, raw in [self._piece(i)]
        )
        text, raw = self._piece(token_id)
        return TokenLogprob(token_id, text, sampled.logprob, raw, top)

    def _piece(self, token_id: int) -> tuple[str, tuple[int, ...]]:
        # NOTE: one token's text alone; a token holding part of a character decodes to U+FFFD
        text = self.tokenizer.decode([token_id])
        return text, tuple(text.encode())

    def _flush(self) -> str:
        if self._stops is None:
            return self._detok.flush()
        text, stopped = self._stops.push(self._detok.flush())
        return text if stopped else text + self._stops.flush()

    def _emit(self, text: str, finish: FinishReason | None) -> Step:
        self.text += text
        logprobs: tuple[TokenLogprob, ...] = ()
        if (text or finish is not None) and self._num_logprobs_sent < len(self.logprobs):
            logprobs = tuple(self.logprobs[self._num_logprobs_sent :])
            self._num_logprobs_sent = len(self.logprobs)
        return Step(text, finish, logprobs)

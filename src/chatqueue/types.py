"""Typed messages that cross layers: what a caller asks for and the events it gets back."""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from chatqueue.errors import ChatQueueError

Role = Literal["system", "user", "assistant", "tool"]


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A call the model made: `arguments` is the JSON text of the arguments, as generated."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A function the model may call; `parameters` is its arguments' JSON schema."""

    name: str
    description: str = ""
    parameters: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def as_openai(self) -> dict[str, Any]:
        """The OpenAI `tools[]` entry (what chat templates read)."""
        function: dict[str, Any] = {"name": self.name, "parameters": dict(self.parameters)}
        if self.description:
            function["description"] = self.description
        return {"type": "function", "function": function}


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """`tool_calls`: the calls an assistant message made; `tool_call_id`: the call a `tool`
    message answers."""

    role: Role
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None


GrammarKind = Literal["json_object", "json_schema", "lark"]


@dataclass(frozen=True, slots=True)
class GrammarSpec:
    """What a reply must match: any JSON object, a JSON schema (its JSON text) or a Lark grammar
    in llguidance's dialect (tool calls). Hashable: compiled grammars are cached by it. `param`
    is the request field a compile error names."""

    kind: GrammarKind
    source: str = ""
    param: str = "response_format"

    @classmethod
    def json_schema(
        cls, schema: Mapping[str, Any], *, param: str = "response_format"
    ) -> GrammarSpec:
        return cls("json_schema", json.dumps(schema), param)


class FinishReason(enum.StrEnum):
    """Why a generation ended. The values are OpenAI's `finish_reason` strings plus ours."""

    STOP = "stop"  # EOS or a stop string
    LENGTH = "length"  # max_tokens or the context window
    ABORT = "abort"  # the client went away, the stop button, or shutdown
    ERROR = "error"  # the runner failed, the queue deadline passed, the server gave up


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-request generation settings, OpenAI's names. Validated at the edge (server schemas)."""

    max_tokens: int | None = None  # None: up to the context window (and the server's cap)
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means off
    repetition_penalty: float = 1.0  # transformers' multiplicative penalty; 1 means off
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # benchmarks: always generate max_tokens
    # None: no logprobs (and no log_softmax for this row); N: the sampled token's logprob and
    # the N most likely alternatives (0..20)
    logprobs: int | None = None
    # the reply is constrained to this grammar (structured output, forced tool calls); the
    # engine holds the matcher, the runner only sees each step's mask
    grammar: GrammarSpec | None = None

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # of the prompt tokens, those whose KV was reused, not computed

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class Queued:
    """The request waits; `position` 1 is next in line. `eta_s` is None until a drain rate is known."""

    position: int
    eta_s: float | None


@dataclass(frozen=True, slots=True)
class Started:
    """The request took a slot after waiting `queue_wait_s` seconds."""

    queue_wait_s: float


@dataclass(frozen=True, slots=True)
class TopLogprob:
    """One of the most likely tokens at a position, as OpenAI reports it."""

    token: str
    logprob: float
    bytes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A generated token, its logprob and the most likely alternatives (most likely first)."""

    token_id: int
    token: str
    logprob: float
    bytes: tuple[int, ...]
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class Token:
    """New text. `text` holds only complete characters and never the start of a stop string.
    `logprobs`: the tokens generated since the last Token, when the request asked for them (a
    token's text may arrive in a later Token than its logprob: whole characters only)."""

    text: str
    num_tokens: int = 1
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class Finished:
    """The end. `error` says why a request ended with ERROR (always set then), or why the server
    cut it short with ABORT (None: its client left)."""

    reason: FinishReason
    usage: Usage
    text: str = ""  # the whole completion
    error: ChatQueueError | None = field(default=None, compare=False)
    logprobs: tuple[TokenLogprob, ...] = field(default=(), compare=False)  # when asked for


Event = Queued | Started | Token | Finished

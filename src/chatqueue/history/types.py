"""What the history stores hold: turns of a conversation, a session's parameters, feedback."""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from chatqueue.types import ChatMessage, SamplingParams

TurnRole = Literal["user", "assistant"]


def new_message_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


@dataclass(frozen=True, slots=True)
class ChatParams:
    """A session's sampling settings; `max_tokens` None means the server's default reply room."""

    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int | None = None

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
        )


@dataclass(frozen=True, slots=True)
class Turn:
    """One message of a conversation. An assistant turn cut short (client gone, stop button,
    shutdown, engine error) keeps what was generated and has `interrupted` set."""

    role: TurnRole
    content: str
    message_id: str = field(default_factory=new_message_id)
    created_at: float = field(default_factory=time.time)
    interrupted: bool = False
    finish_reason: str | None = None
    params: ChatParams | None = None  # what generated an assistant turn

    def message(self) -> ChatMessage:
        return ChatMessage(self.role, self.content)


@dataclass(frozen=True, slots=True)
class Feedback:
    """A thumbs up or down on one reply, with what produced it."""

    message_id: str
    conversation_id: str
    like: bool
    comment: str
    reply: str
    prompt: tuple[ChatMessage, ...]
    params: ChatParams | None
    created_at: float = field(default_factory=time.time)


# -- JSON, for the stores that keep text --------------------------------------------------


def dump(obj: Turn | Feedback | ChatParams) -> str:
    return json.dumps(dataclasses.asdict(obj), ensure_ascii=False, separators=(",", ":"))


def load_params(raw: str | bytes) -> ChatParams:
    return ChatParams(**json.loads(raw))


def load_turn(raw: str | bytes) -> Turn:
    d: dict[str, Any] = json.loads(raw)
    params = d.pop("params", None)
    return Turn(**d, params=ChatParams(**params) if params else None)


def load_feedback(raw: str | bytes) -> Feedback:
    d: dict[str, Any] = json.loads(raw)
    params = d.pop("params", None)
    prompt = tuple(ChatMessage(m["role"], m["content"]) for m in d.pop("prompt"))
    return Feedback(**d, prompt=prompt, params=ChatParams(**params) if params else None)

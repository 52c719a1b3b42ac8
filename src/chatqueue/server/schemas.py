"""Request bodies, validated at the edge: a bad input never reaches the queue."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from chatqueue.types import ChatMessage, SamplingParams


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class MessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def to_message(self) -> ChatMessage:
        text = (
            self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        )
        return ChatMessage("system" if self.role == "developer" else self.role, text)


class SamplingFields(BaseModel):
    """OpenAI's sampling fields, plus top_k and repetition_penalty as extensions.

    Numbers are strict, as OpenAI's are: `"max_tokens": "5"` is a 400, not a quiet 5."""

    model_config = ConfigDict(extra="ignore")

    max_tokens: int | None = Field(None, ge=1, strict=True)
    max_completion_tokens: int | None = Field(None, ge=1, strict=True)
    temperature: float | None = Field(None, ge=0, le=2, strict=True)
    top_p: float | None = Field(None, gt=0, le=1, strict=True)
    top_k: int | None = Field(None, ge=0, strict=True)
    frequency_penalty: float | None = Field(None, ge=-2, le=2, strict=True)
    presence_penalty: float | None = Field(None, ge=-2, le=2, strict=True)
    repetition_penalty: float | None = Field(None, gt=0, le=10, strict=True)
    seed: int | None = Field(None, strict=True)
    stop: str | list[str] | None = None
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _at_most_four(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v

    def sampling_params(self) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        d = SamplingParams()
        return SamplingParams(
            max_tokens=self.max_completion_tokens or self.max_tokens,
            temperature=d.temperature if self.temperature is None else self.temperature,
            top_p=d.top_p if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            repetition_penalty=self.repetition_penalty or 1.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            seed=self.seed,
            stop=stop,
            ignore_eos=self.ignore_eos,
        )


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(SamplingFields):
    model: str | None = None
    messages: list[MessageIn] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=1, strict=True, description="Only 1 is supported")
    user: str | None = Field(None, max_length=256)

    def chat_messages(self) -> list[ChatMessage]:
        return [m.to_message() for m in self.messages]


class ChatStreamRequest(SamplingFields):
    """The body `ChatQueue.handle_chat_stream_request` takes."""

    messages: list[MessageIn] = Field(min_length=1)
    user: str | None = Field(None, max_length=256)

    def chat_messages(self) -> list[ChatMessage]:
        return [m.to_message() for m in self.messages]

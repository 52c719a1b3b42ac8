"""Request bodies, validated at the edge: a bad input never reaches the queue."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from chatqueue.types import ChatMessage, SamplingParams


def _encodable(v: str) -> str:
    # NOTE: JSON may spell a lone surrogate ("\udc80"): a Python str, but no UTF-8 text. Let in,
    # it would fail only when echoed back, as a 500 or a stream cut short.
    try:
        v.encode()
    except UnicodeEncodeError:
        raise ValueError("not valid Unicode text (a lone surrogate)") from None
    return v


Text = Annotated[str, AfterValidator(_encodable)]


# NOTE: every body model is strict, as OpenAI's API is: no coercion between strings, numbers and
# booleans ("stream": "true", "stream": 1, "temperature": "0.5", "content": 5 are 400s), and an
# integer field refuses a float even when it is whole ("max_tokens": 5.0), as OpenAI does
# ("expected an integer, but got a decimal number"). A float field takes an integer (JSON has one
# number type; OpenAI takes "temperature": 1).
STRICT = ConfigDict(strict=True, extra="ignore")


class TextPart(BaseModel):
    model_config = STRICT

    type: Literal["text"]
    text: str


class MessageIn(BaseModel):
    model_config = STRICT

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: Text | None = None

    @field_validator("content")
    @classmethod
    def _content_encodable(cls, v: str | list[TextPart]) -> str | list[TextPart]:
        for text in [v] if isinstance(v, str) else [p.text for p in v]:
            _encodable(text)
        return v

    def to_message(self) -> ChatMessage:
        text = (
            self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        )
        return ChatMessage("system" if self.role == "developer" else self.role, text)


class SamplingFields(BaseModel):
    """OpenAI's sampling fields, plus top_k and repetition_penalty as extensions.

    Strict, as OpenAI's are: `"max_tokens": "5"` is a 400, not a quiet 5."""

    model_config = STRICT

    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    seed: int | None = Field(None)
    stop: str | list[str] | None = None
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _at_most_four(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        for text in [v] if isinstance(v, str) else v or []:
            _encodable(text)
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
    model_config = STRICT

    include_usage: bool = False


class ChatCompletionRequest(SamplingFields):
    model: Text | None = None
    messages: list[MessageIn] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=1, description="Only 1 is supported")
    user: Text | None = Field(None, max_length=256)
    queue_timeout: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="Extension: most seconds to wait in the queue; may only lower the server's",
    )

    def chat_messages(self) -> list[ChatMessage]:
        return [m.to_message() for m in self.messages]


class ChatStreamRequest(SamplingFields):
    """The body `ChatQueue.handle_chat_stream_request` takes."""

    messages: list[MessageIn] = Field(min_length=1)
    user: Text | None = Field(None, max_length=256)

    def chat_messages(self) -> list[ChatMessage]:
        return [m.to_message() for m in self.messages]

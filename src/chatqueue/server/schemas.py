"""Request bodies, validated at the edge: a bad input never reaches the queue."""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from chatqueue.types import ChatMessage, GrammarSpec, SamplingParams, ToolCall, ToolSpec


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


FunctionName = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]


class FunctionCallIn(BaseModel):
    model_config = STRICT

    name: FunctionName
    arguments: Text


class ToolCallIn(BaseModel):
    """A call an assistant message made, sent back in the conversation."""

    model_config = STRICT

    id: Text = Field(max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCallIn


class MessageIn(BaseModel):
    model_config = STRICT

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: Text | None = None
    tool_calls: list[ToolCallIn] | None = None  # assistant
    tool_call_id: Text | None = Field(None, max_length=256)  # tool: the call it answers

    @field_validator("content")
    @classmethod
    def _content_encodable(cls, v: str | list[TextPart] | None) -> str | list[TextPart] | None:
        for text in [v] if isinstance(v, str) else [p.text for p in v or []]:
            _encodable(text)
        return v

    @model_validator(mode="after")
    def _fits_role(self) -> MessageIn:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (it may be null only with tool_calls)")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only an assistant message has tool_calls")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool message needs the tool_call_id it answers")
        return self

    def to_message(self) -> ChatMessage:
        content = self.content or ""
        text = content if isinstance(content, str) else "".join(p.text for p in content)
        calls = tuple(
            ToolCall(c.id, c.function.name, c.function.arguments) for c in self.tool_calls or ()
        )
        role = "system" if self.role == "developer" else self.role
        return ChatMessage(role, text, tool_calls=calls, tool_call_id=self.tool_call_id)


# -- structured output and tools -----------------------------------------------------------------
JsonObject = dict[str, Any]


class JsonSchemaIn(BaseModel):
    model_config = STRICT

    name: Text = Field(max_length=64)
    description: Text | None = None
    schema_: JsonObject = Field(default_factory=dict, alias="schema")
    strict: bool | None = None  # the schema is always enforced


class ResponseFormat(BaseModel):
    model_config = STRICT

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaIn | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs json_schema")
        return self

    def grammar(self) -> GrammarSpec | None:
        if self.type == "json_object":
            return GrammarSpec("json_object")
        if self.type == "json_schema":
            assert self.json_schema is not None
            return GrammarSpec.json_schema(self.json_schema.schema_)
        return None


class FunctionIn(BaseModel):
    model_config = STRICT

    name: FunctionName
    description: Text | None = None
    parameters: JsonObject | None = None
    strict: bool | None = None  # the parameters are enforced when a call is forced


class ToolIn(BaseModel):
    model_config = STRICT

    type: Literal["function"]
    function: FunctionIn

    def spec(self) -> ToolSpec:
        f = self.function
        return ToolSpec(f.name, f.description or "", f.parameters or {})


class NamedFunction(BaseModel):
    model_config = STRICT

    name: FunctionName


class NamedToolChoice(BaseModel):
    model_config = STRICT

    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


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

    def sampling_params(self, defaults: SamplingParams | None = None) -> SamplingParams:
        """`defaults`: what a field the request leaves out takes (the model's generation
        config's sampling settings, where it has them)."""
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        d = defaults or SamplingParams()
        return SamplingParams(
            max_tokens=self.max_completion_tokens or self.max_tokens,
            temperature=d.temperature if self.temperature is None else self.temperature,
            top_p=d.top_p if self.top_p is None else self.top_p,
            top_k=d.top_k if self.top_k is None else self.top_k,
            repetition_penalty=self.repetition_penalty or d.repetition_penalty,
            frequency_penalty=self.frequency_penalty or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            seed=self.seed,
            stop=stop,
            ignore_eos=self.ignore_eos,
        )


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = False


MAX_CHOICES = 128  # n, times the prompts of a completions request


class OpenAIRequest(SamplingFields):
    """What both completion APIs take besides the prompt."""

    model: Text | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(
        None, ge=1, le=MAX_CHOICES, description="Choices per prompt; each is a sequence"
    )
    user: Text | None = Field(None, max_length=256)
    queue_timeout: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="Extension: most seconds to wait in the queue; may only lower the server's",
    )
    response_format: ResponseFormat | None = None

    @property
    def num_choices(self) -> int:
        """Choices per prompt."""
        return self.n or 1

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def choice_params(
        self, logprobs: int | None, defaults: SamplingParams | None = None
    ) -> list[SamplingParams]:
        """One SamplingParams per choice: choice i of a seeded request uses seed + i, so the
        same seed and prompt give the same choices whatever else shares the batch."""
        base = replace(self.sampling_params(defaults), logprobs=logprobs)
        if base.seed is None:
            return [base] * self.num_choices
        return [replace(base, seed=base.seed + i) for i in range(self.num_choices)]


class ChatCompletionRequest(OpenAIRequest):
    messages: list[MessageIn] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[ToolIn] | None = Field(None, max_length=128)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        return self

    @property
    def tool_choice_mode(self) -> str:
        """none, auto, required, or the name of the function that must be called. OpenAI's
        default: auto with tools, none without."""
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice):
            return choice.function.name
        return choice or ("auto" if self.tools else "none")

    @property
    def offered_tools(self) -> list[ToolSpec]:
        """The tools shown to the model: none when tool_choice is none."""
        return [] if self.tool_choice_mode == "none" else [t.spec() for t in self.tools or ()]

    def chat_messages(self) -> list[ChatMessage]:
        return [m.to_message() for m in self.messages]

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


TokenIds = list[Annotated[int, Field(ge=0)]]


class CompletionRequest(OpenAIRequest):
    """The legacy completions API: a prompt (text, token ids, or a list of either; each prompt
    gets `n` choices), `echo`, and `logprobs` as the number of alternatives (0..20)."""

    prompt: Text | list[Text] | TokenIds | list[TokenIds]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    suffix: None = Field(None, description="Not supported: only null")

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, v: str | list[str] | list[int] | list[list[int]]) -> object:
        items = [v] if isinstance(v, str) else v
        if not items or any(isinstance(p, str | list) and not p for p in items):
            raise ValueError("the prompt must not be empty")
        return v

    @model_validator(mode="after")
    def _not_too_many_choices(self) -> CompletionRequest:
        if len(self.prompts) * self.num_choices > MAX_CHOICES:
            raise ValueError(f"at most {MAX_CHOICES} choices (prompts times n)")
        return self

    @property
    def prompts(self) -> list[str] | list[list[int]]:
        """Each prompt of the request: text, or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [p]  # type: ignore[list-item]
        return p  # type: ignore[return-value]


class ChatStreamRequest(SamplingFields):
    """The body `ChatQueue.handle_chat_stream_request` takes."""

    messages: list[MessageIn] = Field(min_length=1)
    user: Text | None = Field(None, max_length=256)

    def chat_messages(self) -> list[ChatMessage]:
        return [m.to_message() for m in self.messages]

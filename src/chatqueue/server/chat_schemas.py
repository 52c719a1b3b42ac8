"""Bodies of the chat routes, validated at the edge."""

from __future__ import annotations

import dataclasses

from pydantic import BaseModel, ConfigDict, Field

from chatqueue.history.types import ChatParams

MAX_MESSAGE_CHARS = 32_000
MAX_TOP_K = 1000

# NOTE: strict like the OpenAI bodies (schemas.py): "regenerate": "yes", "like": 1 or
# "max_tokens": 5.0 are 400s, never coerced.
STRICT = ConfigDict(strict=True, extra="forbid")


class ChatIn(BaseModel):
    model_config = STRICT

    message: str | None = Field(None, max_length=MAX_MESSAGE_CHARS)
    conversation_id: str | None = Field(None, max_length=200)
    regenerate: bool = False


class ConversationIn(BaseModel):
    model_config = STRICT

    conversation_id: str | None = Field(None, max_length=200)


class ParamsIn(BaseModel):
    """A partial update: fields left out keep their value; `max_tokens: null` is the default."""

    model_config = STRICT

    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=MAX_TOP_K)
    max_tokens: int | None = Field(None, ge=1)

    def merged(self, current: ChatParams) -> ChatParams:
        given = self.model_dump(include=self.model_fields_set)
        for name in ("temperature", "top_p", "top_k"):
            if given.get(name, 0) is None:
                given.pop(name)  # only max_tokens has a meaning for null
        return ChatParams(**{**dataclasses.asdict(current), **given})


class FeedbackIn(BaseModel):
    model_config = STRICT

    message_id: str = Field(max_length=100)
    like: bool
    comment: str = Field("", max_length=4000)
    conversation_id: str | None = Field(None, max_length=200)

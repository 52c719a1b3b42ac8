"""What a front answers itself when its queue is in another process (a cluster's replicas, the
core under several API servers): everything that needs only the model's `Description`, the
tokenizer, names, sampling defaults, the tool-call format, a prompt's tokens, the room check.
The queue's own side (admission, the streams, the figures) is each front's."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from chatqueue.api.admission import TokenBudget
from chatqueue.api.chat_queue import sampling_defaults_of
from chatqueue.api.wire import Description
from chatqueue.errors import InvalidRequest, NotReady, ShuttingDown
from chatqueue.text.tokenizer import Tokenizer
from chatqueue.text.tool_calls import ToolCallFormat
from chatqueue.text.tool_prompt import format_for, prompt_encoder
from chatqueue.types import ChatMessage, SamplingParams, ToolSpec


class DescribedQueue:
    """The part of `api.QueueService` a front serves from the model's description."""

    holder = "the server"  # who holds the places, as the room check's message says

    def __init__(
        self,
        *,
        tool_call_format: str,
        max_prompt_tokens: int | None,
        max_tokens_cap: int | None,
    ) -> None:
        self._description: Description | None = None
        self._tool_call_format = tool_call_format
        self._max_prompt_tokens = max_prompt_tokens
        self._max_tokens_cap = max_tokens_cap
        self._tokenizer_pool = ThreadPoolExecutor(1, thread_name_prefix="chatqueue-tokenizer")

    @property
    def is_closed(self) -> bool:
        """No longer admitting (stopping, or its queue is gone)."""
        return False

    @property
    def description(self) -> Description:
        if self.is_closed:
            raise ShuttingDown("The server is shutting down and takes no new requests.")
        if self._description is None:
            raise NotReady("The model is still loading. Retry in a few seconds.")
        return self._description

    @property
    def tokenizer(self) -> Tokenizer:
        return self.description.tokenizer

    @property
    def model_name(self) -> str:
        return self.description.model_name

    @property
    def context_window(self) -> int:
        return self.description.context_window

    @property
    def sampling_defaults(self) -> SamplingParams:
        return sampling_defaults_of(self.tokenizer)

    @property
    def token_budget(self) -> TokenBudget:
        return TokenBudget(self.context_window, self._max_prompt_tokens, self._max_tokens_cap)

    @property
    def tool_call_format(self) -> ToolCallFormat:
        configured = self._tool_call_format
        return format_for(
            self.tokenizer, None if configured == "auto" else ToolCallFormat(configured)
        )

    async def encode(
        self, messages: Sequence[ChatMessage], tools: Sequence[ToolSpec] = ()
    ) -> list[int]:
        encode = prompt_encoder(self.tokenizer, messages, tools, self.tool_call_format)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenizer_pool, encode)

    def check_room(self, num_places: int) -> None:
        """What can be known before asking the queue: shutting down, loading, or more choices
        than it ever holds (a 400). Whether there is room is the queue's to say, choice by
        choice (a request's choices are placed one by one, and all are refused if one is)."""
        d = self.description
        most = d.max_concurrent + d.max_queue_size
        if num_places > most:
            raise InvalidRequest(
                f"This request has {num_places} choices, each a sequence that needs a place; "
                f"{self.holder} holds at most {most} ({d.max_concurrent} running, "
                f"{d.max_queue_size} waiting).",
                param="n",
            )

    def close_tokenizer(self) -> None:
        self._tokenizer_pool.shutdown(wait=False, cancel_futures=True)

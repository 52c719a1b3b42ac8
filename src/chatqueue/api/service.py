"""What the HTTP routes and the chat service need of a queue, as a Protocol: `ChatQueue` over one
model, a cluster's front (`chatqueue.cluster`) over many replicas, each a ChatQueue, or an API
server beside others over the core's ChatQueue (`chatqueue.fronts`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from chatqueue.api.admission import TokenBudget
from chatqueue.api.chat_queue import LoadInfo
from chatqueue.api.stream import RequestStream
from chatqueue.errors import ServiceUnavailable
from chatqueue.metrics import Exposed
from chatqueue.text.tokenizer import Tokenizer
from chatqueue.text.tool_calls import ToolCallFormat
from chatqueue.types import ChatMessage, SamplingParams, ToolSpec


class QueueService(Protocol):
    """Admission, the request stream, the figures and the life cycle, as `ChatQueue` has them
    (its docstrings say what each does)."""

    @property
    def metrics(self) -> Exposed: ...

    async def start_queue_worker(self) -> None: ...

    async def wait_ready(self, timeout_s: float | None = None) -> None: ...

    async def stop(self, timeout_s: float = 30.0) -> None: ...

    @property
    def health(self) -> str: ...

    @property
    def load_error(self) -> BaseException | None: ...

    @property
    def last_model_exit(self) -> str | None: ...

    def unavailable_error(self) -> ServiceUnavailable | None: ...

    @property
    def tokenizer(self) -> Tokenizer: ...

    @property
    def model_name(self) -> str: ...

    @property
    def context_window(self) -> int: ...

    @property
    def token_budget(self) -> TokenBudget: ...

    @property
    def sampling_defaults(self) -> SamplingParams: ...

    @property
    def engine_info(self) -> dict[str, Any]: ...

    async def submit(
        self,
        messages: Sequence[ChatMessage],
        params: SamplingParams | None = None,
        *,
        user: str = "",
        priority: int = 0,
        queue_timeout_s: float | None = None,
        max_queue_per_user: int | None = None,
        cap_key: str | None = None,
        tools: Sequence[ToolSpec] = (),
    ) -> RequestStream: ...

    async def submit_prompt(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        user: str = "",
        priority: int = 0,
        queue_timeout_s: float | None = None,
        max_queue_per_user: int | None = None,
        cap_key: str | None = None,
    ) -> RequestStream: ...

    async def encode(
        self, messages: Sequence[ChatMessage], tools: Sequence[ToolSpec] = ()
    ) -> list[int]: ...

    @property
    def tool_call_format(self) -> ToolCallFormat: ...

    def check_room(self, num_places: int) -> None: ...

    def load(self) -> LoadInfo: ...

    async def load_now(self) -> LoadInfo: ...

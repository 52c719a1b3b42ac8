"""What the server needs of a tokenizer: chat templates in, text out."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from chatqueue.types import ChatMessage, ToolSpec


@runtime_checkable
class Tokenizer(Protocol):
    """Encoding runs on the tokenizer thread, decoding on the engine thread; an implementation
    must allow both at once (HFTokenizer keeps two instances)."""

    @property
    def eos_token_ids(self) -> frozenset[int]: ...

    def apply_chat_template(self, messages: Sequence[ChatMessage]) -> list[int]:
        """The prompt token ids for a conversation, ending where the assistant's reply begins."""
        ...

    def decode(self, token_ids: Sequence[int]) -> str: ...


@runtime_checkable
class TextTokenizer(Tokenizer, Protocol):
    """A tokenizer that also encodes plain text (the legacy completions API's prompts) and knows
    its vocabulary (to refuse a token id the model has no row for)."""

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...


@runtime_checkable
class ToolTemplate(Protocol):
    """A tokenizer whose chat template may know tools (`supports_tools`): then tools and tool
    messages go to the template as they are (text.tool_prompt renders them otherwise)."""

    @property
    def supports_tools(self) -> bool: ...

    @property
    def chat_template(self) -> str: ...

    def apply_chat_template_with_tools(
        self, messages: Sequence[ChatMessage], tools: Sequence[ToolSpec]
    ) -> list[int]: ...


# One request's reply, decoded a token at a time: the text the token completes, or None while it
# holds part of a character (or adds nothing yet). Raises where the text decoded before the token
# is not the start of the text with it; the caller then decodes that request itself.
StepDecode = Callable[[int], "str | None"]


@runtime_checkable
class StreamDecoding(Protocol):
    """A tokenizer with its own incremental decoder (text/detokenizer.py's way, in one call a
    token): the Rust tokenizers' DecodeStream."""

    def stream_decoder(self) -> StepDecode | None:
        """A new request's decoder; None where this tokenizer has none after all."""
        ...

"""`Tokenizer` over a Hugging Face tokenizer, safe to encode and decode at the same time, and its
loading from a local model folder (the server process loads it; the model process never does)."""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

# Offline before transformers is imported: huggingface_hub reads this once, at import.
os.environ["HF_HUB_OFFLINE"] = "1"

import jinja2
import jinja2.meta
from tokenizers.decoders import DecodeStream
from transformers import GenerationConfig, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from chatqueue.text.tokenizer import StepDecode
from chatqueue.text.tool_prompt import template_messages
from chatqueue.types import ChatMessage, SamplingParams, ToolSpec


class MissingChatTemplate(ValueError):
    def __init__(self, model_name: str) -> None:
        super().__init__(
            f"{model_name} has no chat template; pass a Jinja template file with --chat-template"
        )


class HFTokenizer:
    """Encodes on the tokenizer thread and decodes on the engine thread. A Rust fast tokenizer raises
    "Already borrowed" when two threads use it at once, so each side gets its own instance."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        *,
        model_name: str,
        eos_token_ids: Iterable[int],
        chat_template: str | None = None,
        sampling_defaults: SamplingParams | None = None,
    ) -> None:
        """`sampling_defaults`: what a request's left-out sampling fields take (the model's
        generation config)."""
        self.sampling_defaults = sampling_defaults or SamplingParams()
        if chat_template is not None:
            tokenizer.chat_template = chat_template
        if not tokenizer.chat_template:
            raise MissingChatTemplate(model_name)
        self._encoder = tokenizer
        self._decoder = copy.deepcopy(tokenizer)
        self._backend = _rust_backend(self._decoder)
        eos = set(eos_token_ids)
        if tokenizer.eos_token_id is not None:
            eos.add(int(tokenizer.eos_token_id))
        self._eos_token_ids = frozenset(eos)
        self._supports_tools: bool | None = None

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos_token_ids

    @property
    def chat_template(self) -> str:
        template = self._encoder.chat_template
        assert isinstance(template, str), "checked in __init__"
        return template

    def apply_chat_template(self, messages: Sequence[ChatMessage]) -> list[int]:
        conversation = [{"role": m.role, "content": m.content} for m in messages]
        encoded = self._encoder.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=True
        )
        return _as_ids(encoded)

    @property
    def supports_tools(self) -> bool:
        """Whether the chat template reads a `tools` variable."""
        if self._supports_tools is None:
            parsed = jinja2.Environment().parse(self.chat_template)
            self._supports_tools = "tools" in jinja2.meta.find_undeclared_variables(parsed)
        return self._supports_tools

    def apply_chat_template_with_tools(
        self, messages: Sequence[ChatMessage], tools: Sequence[ToolSpec]
    ) -> list[int]:
        encoded = self._encoder.apply_chat_template(
            template_messages(messages),
            tools=[t.as_openai() for t in tools] or None,
            add_generation_prompt=True,
            tokenize=True,
        )
        return _as_ids(encoded)

    def tokenizer_json(self) -> str:
        """The Rust tokenizer as JSON (what the grammar library reads), without padding or
        truncation."""
        backend = getattr(self._encoder, "backend_tokenizer", None)
        if backend is None:
            raise ValueError("a slow (Python) tokenizer has no tokenizer.json")
        backend = copy.copy(backend)
        backend.no_padding()
        backend.no_truncation()
        text = backend.to_str()
        assert isinstance(text, str)
        return text

    @property
    def vocab_size(self) -> int:
        return len(self._encoder)

    def encode(self, text: str) -> list[int]:
        """Plain text, with the special tokens the tokenizer adds by default (BOS), as vLLM."""
        return _as_ids(self._encoder.encode(text))

    def stream_decoder(self) -> StepDecode | None:
        """The Rust tokenizer's DecodeStream over the decoding instance, where transformers adds
        nothing to its decode (as `decode` below). NOTE: why. The engine thread detokenizes a
        token a stream each step, holding the GIL: the detokenizer's window in Python took 1.6 us
        a token (SmolLM2, 256 streams), DecodeStream's one call 0.7 us."""
        if self._backend is None:
            return None
        return functools.partial(DecodeStream(skip_special_tokens=True).step, self._backend)

    def decode(self, token_ids: Sequence[int]) -> str:
        if self._backend is not None:
            decoded: str = self._backend.decode(list(token_ids), skip_special_tokens=True)
            return decoded
        text = self._decoder.decode(
            list(token_ids), skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        assert isinstance(text, str), "one sequence in, one string out"
        return text


def _rust_backend(tokenizer: PreTrainedTokenizerBase) -> Any | None:
    """The Rust tokenizer behind `tokenizer`, where transformers' decode adds nothing to the Rust
    one's (a fast tokenizer whose class keeps the base `decode` and `_decode`; we never clean up
    spaces); else None.

    NOTE: why. The engine thread decodes a token a stream each step, holding the GIL the event
    loop needs; transformers' wrapper (argument conversion, checks) was 4.6x the Rust call's own
    cost (2.4 against 0.5 us, SmolLM2)."""
    cls = type(tokenizer)
    if not isinstance(tokenizer, PreTrainedTokenizerFast) or any(
        getattr(cls, name) is not getattr(PreTrainedTokenizerFast, name)
        for name in ("decode", "_decode")
    ):
        return None
    return tokenizer.backend_tokenizer


def _as_ids(encoded: Any) -> list[int]:
    """transformers 5 returns a BatchEncoding where 4.x returned a list; accept either, or a batch of one."""
    if isinstance(encoded, Mapping):
        encoded = encoded["input_ids"]
    if hasattr(encoded, "tolist"):
        encoded = encoded.tolist()
    if encoded and isinstance(encoded[0], list):
        assert len(encoded) == 1, "one conversation in, one prompt out"
        encoded = encoded[0]
    return [int(token_id) for token_id in encoded]


def load_tokenizer(folder: Path, *, model_name: str, chat_template: str | None) -> HFTokenizer:
    """The tokenizer of a local HF model folder, with EOS ids from its generation config.

    NOTE: a folder with a `tokenizer.json` (nearly every model's) is read by the fast tokenizer
    class directly: transformers' AutoTokenizer imports torch, which the server process,
    whose model lives in another process, has no other use for (+280 MB of memory)."""
    if (folder / "tokenizer.json").is_file():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(folder, local_files_only=True)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    generation = _generation_config(folder)
    return HFTokenizer(
        tokenizer,
        model_name=model_name,
        eos_token_ids=generation_eos_ids(generation),
        chat_template=chat_template,
        sampling_defaults=generation_sampling_defaults(generation),
    )


def _generation_config(folder: Path) -> GenerationConfig | None:
    try:
        return GenerationConfig.from_pretrained(folder, local_files_only=True)
    except OSError:  # the folder has no generation_config.json
        return None


def generation_sampling_defaults(config: GenerationConfig | None) -> SamplingParams:
    """The sampling settings a model's generation config asks for (Qwen3's temperature 0.6,
    top_p 0.95, top_k 20, say), as the defaults of requests that leave them out. Only where it
    samples (`do_sample`): a config that does not says nothing about sampling settings, and
    its requests keep the server's defaults, not greedy decoding."""
    d = SamplingParams()
    if config is None or not config.do_sample:
        return d
    return SamplingParams(
        temperature=d.temperature if config.temperature is None else float(config.temperature),
        top_p=d.top_p if config.top_p is None else float(config.top_p),
        top_k=d.top_k if config.top_k is None else int(config.top_k),
        repetition_penalty=(
            d.repetition_penalty
            if config.repetition_penalty is None
            else float(config.repetition_penalty)
        ),
    )


def generation_eos_ids(config: GenerationConfig | None) -> set[int]:
    """EOS ids from generation_config.json, which may hold one id or a list (chat models often end
    turns with a token other than the tokenizer's eos)."""
    if config is None:
        return set()
    eos = config.eos_token_id
    if eos is None:
        return set()
    return {int(eos)} if isinstance(eos, int) else {int(i) for i in eos}

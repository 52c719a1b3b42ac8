"""Settings -> a LlamaCppRunner over a GGUF file (in the model process, as the hf runners load)."""

from __future__ import annotations

from pathlib import Path

from chatqueue.config import Settings
from chatqueue.engine.llamacpp.context import ContextConfig, LlamaContext
from chatqueue.engine.llamacpp.runner import LlamaCppRunner

DEFAULT_CONTEXT_WINDOW = 4096


def load_llamacpp_runner(settings: Settings, gguf: Path, *, threads: int) -> LlamaCppRunner:
    """One KV slot per running sequence (`max_concurrent`), each `max_model_len` tokens (default
    4096, at most what the model was trained for)."""
    slots = settings.max_concurrent
    window = settings.max_model_len or DEFAULT_CONTEXT_WINDOW
    context = LlamaContext(
        gguf,
        ContextConfig(
            slots=slots,
            context_window=window,
            batch_tokens=slots + settings.prefill_chunk,
            threads=threads,
            kv=settings.llamacpp_kv,
            kv_choice_file=settings.cache / "llamacpp" / "kv-choice.json",
        ),
    )
    return LlamaCppRunner(
        context,
        slots=slots,
        prefill_chunk=settings.prefill_chunk,
        prefill_stall_limit=settings.prefill_stall_limit or None,
        prefix_reuse=settings.prefix_caching == "on",
    )

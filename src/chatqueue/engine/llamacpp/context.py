"""llama.cpp through llama-cpp-python's low-level API: one model, one context whose KV cache keeps
one stream per sequence slot (of the kind `kv_choice` picks), decode of a TokenBatch, and the
logits as a torch tensor.

NOTE: the KV cache is not unified (`kv_unified` off): each slot has its own stream of
`context_window` cells, so a decode step's attention reads each sequence's own cells only. With a
unified cache every token attends over the cells of all sequences (masked), which grows with the
square of the batch; a unified cache pays off only where sequences share a long prefix at once.
The price: the whole cache is allocated up front, slots x context_window cells."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import torch

from chatqueue.engine.llamacpp import kv_choice
from chatqueue.engine.llamacpp.batch import TokenBatch

log = logging.getLogger(__name__)


class LlamaCppError(RuntimeError):
    """llama.cpp could not load the model, make a context, or decode a batch."""


@dataclass(frozen=True, slots=True)
class ContextConfig:
    slots: int  # sequences held at once, each in its own KV stream
    context_window: int  # KV cells of one slot (the longest sequence), at most the model's trained
    batch_tokens: int  # most tokens one decode takes (decode rows + prompt chunk)
    threads: int
    kv: str = "auto"  # a kind of kv_choice.KINDS, or auto: measured (kv_choice.choose)
    kv_choice_file: Path | None = None  # where a measured choice is kept


class LlamaContext:
    def __init__(self, gguf: Path, config: ContextConfig) -> None:
        _quiet_llama_cpp()
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = 0
        # NOTE: no extra CPU buffer types (AMX, repacked weights). On a 2-vCPU Intel Xeon VM with
        # AMX, llama.cpp's AMX matmul crashed the process (SIGSEGV in ggml_backend_amx_mul_mat)
        # at the first prompt of more than a few tokens; and repacking has no layout for Q4_1,
        # the default model's layers.
        model_params.use_extra_bufts = False
        self._model = llama_cpp.llama_model_load_from_file(str(gguf).encode(), model_params)
        if not self._model:
            raise LlamaCppError(f"llama.cpp could not load {gguf}")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.vocab_size = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self.trained_context = int(llama_cpp.llama_model_n_ctx_train(self._model))
        self._threads = config.threads
        self.kv_cache = config.kv
        if config.kv == "auto":
            self.kv_cache = kv_choice.choose(
                self._model,
                self._context,
                gguf=gguf,
                threads=config.threads,
                cache_file=config.kv_choice_file,
            )
        cells = min(config.context_window, self.trained_context)
        self._ctx = self._context(
            kv_choice.KINDS[self.kv_cache], config.slots, cells, batch_tokens=config.batch_tokens
        )
        if not self._ctx:
            llama_cpp.llama_model_free(self._model)
            raise LlamaCppError(f"llama.cpp could not make a context for {gguf}")
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self.context_window = int(llama_cpp.llama_n_ctx_seq(self._ctx))
        self.batch = TokenBatch(config.batch_tokens)
        log.info(
            "llama.cpp: %s, %d slots of %d tokens, KV cache %s, %d threads",
            gguf.name,
            config.slots,
            self.context_window,
            self.kv_cache,
            config.threads,
        )

    def _context(
        self,
        kind: kv_choice.KVKind,
        slots: int,
        cells: int,
        *,
        batch_tokens: int | None = None,
    ) -> Any:  # llama_cpp.llama_context_p, or NULL
        """A context of `slots` sequences of `cells` each, its KV cache of `kind`."""
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = slots * cells
        params.n_seq_max = slots
        params.n_batch = params.n_ubatch = batch_tokens or cells
        params.n_threads = params.n_threads_batch = self._threads
        params.kv_unified = False
        params.no_perf = True
        params.type_k = params.type_v = kind.type_kv
        params.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
            if kind.flash_attention
            else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        return llama_cpp.llama_init_from_model(self._model, params)

    def decode(self) -> torch.Tensor:
        """Run `self.batch`; returns [outputs, vocab] float32 logits, one row per token that asked,
        in batch order. The tensor is a view of llama.cpp's buffer: valid until the next decode."""
        if self.batch.size == 0:
            return torch.empty(0, self.vocab_size)
        code = llama_cpp.llama_decode(self._ctx, self.batch.as_llama_batch())
        if code != 0:
            raise LlamaCppError(f"llama_decode returned {code} for {self.batch.size} tokens")
        n = self.batch.num_outputs
        if n == 0:
            return torch.empty(0, self.vocab_size)
        pointer = llama_cpp.llama_get_logits(self._ctx)
        return torch.from_numpy(np.ctypeslib.as_array(pointer, shape=(n, self.vocab_size)))

    def keep_prefix(self, seq_id: int, length: int) -> bool:
        """Drop the cells of `seq_id` from position `length` on; False if llama.cpp cannot cut
        there (the caller then clears the whole sequence)."""
        return bool(llama_cpp.llama_memory_seq_rm(self._memory, seq_id, length, -1))

    def copy_prefix(self, source: int, seq_id: int, length: int) -> bool:
        """Make `seq_id` hold the first `length` cells of `source` (each slot its own stream:
        llama.cpp copies the whole stream, at the next decode, before that decode's tokens go
        in); False if it cannot be cut there (the caller then clears the sequence)."""
        llama_cpp.llama_memory_seq_rm(self._memory, seq_id, -1, -1)
        llama_cpp.llama_memory_seq_cp(self._memory, source, seq_id, -1, -1)
        return self.keep_prefix(seq_id, length)

    def clear(self, seq_id: int) -> None:
        llama_cpp.llama_memory_seq_rm(self._memory, seq_id, -1, -1)

    def close(self) -> None:
        if self._ctx:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            llama_cpp.llama_model_free(self._model)
            self._model = None


# ggml's log levels: NONE, DEBUG, INFO, WARN, ERROR, CONT (the previous line goes on)
_LEVELS = {
    0: logging.DEBUG,
    1: logging.DEBUG,
    2: logging.DEBUG,
    3: logging.WARNING,
    4: logging.ERROR,
}
_last_level = logging.DEBUG


@llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
def _to_logging(level: int, text: bytes, user_data: object) -> None:
    """llama.cpp's log lines into ours: its load details at debug, its warnings and errors as such.
    (llama-cpp-python's own callback prints them to stderr, by an outdated level table.)"""
    global _last_level
    _last_level = _LEVELS.get(level, _last_level)
    line = text.decode("utf-8", errors="replace").rstrip()
    if line:
        log.log(_last_level, "%s", line)


def _quiet_llama_cpp() -> None:
    llama_cpp.llama_log_set(_to_logging, None)

"""llama.cpp through llama-cpp-python's low-level API: one model, one context whose KV cache keeps
one stream per sequence slot, decode of a TokenBatch, and the logits as a torch tensor.

NOTE: the KV cache is not unified (`kv_unified` off): each slot has its own stream of
`context_window` cells, so a decode step's attention reads each sequence's own cells only. With a
unified cache every token attends over the cells of all sequences (masked), which grows with the
square of the batch; a unified cache pays off only where sequences share a long prefix at once.
The price: the whole cache is allocated up front, slots x context_window cells."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import numpy as np
import torch

from chatqueue.engine.llamacpp.batch import TokenBatch

log = logging.getLogger(__name__)


# NOTE: the KV cache in q8_0 with flash attention (which a quantized V cache needs), not
# llama.cpp's default (f16, flash attention on a CPU too). Measured on one thread (RESULTS.md,
# issue 17): the default's decode slows with the context, 17.5 ms a token at 40 positions but
# 40.4 ms at 1,000 (8 sequences: 74 and 253 ms a step); q8_0 with flash attention runs 17.1 and
# 24.9 ms (65 and 123 ms), within 6% of f16 without flash attention at 1,000 and faster than
# either below 400. It also halves the KV memory every slot holds from the start.
KV_CACHE_TYPE = "q8_0"


class LlamaCppError(RuntimeError):
    """llama.cpp could not load the model, make a context, or decode a batch."""


@dataclass(frozen=True, slots=True)
class ContextConfig:
    slots: int  # sequences held at once, each in its own KV stream
    context_window: int  # KV cells of one slot (the longest sequence), at most the model's trained
    batch_tokens: int  # most tokens one decode takes (decode rows + prompt chunk)
    threads: int


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
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = config.slots * min(config.context_window, self.trained_context)
        params.n_seq_max = config.slots
        params.n_batch = params.n_ubatch = config.batch_tokens
        params.n_threads = params.n_threads_batch = config.threads
        params.kv_unified = False
        params.no_perf = True
        # KV_CACHE_TYPE, with the flash attention a quantized V cache needs
        params.type_k = params.type_v = llama_cpp.GGML_TYPE_Q8_0
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        self._ctx = llama_cpp.llama_init_from_model(self._model, params)
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
            KV_CACHE_TYPE,
            config.threads,
        )

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

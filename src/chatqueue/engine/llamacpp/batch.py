"""A `llama_batch` whose arrays are numpy arrays of ours, filled a step at a time without a Python
loop per token field.

NOTE: built by hand rather than by `llama_batch_init`: each token's sequence-id pointer points into
one array of ours, so a step writes every token's sequence with one slice assignment, and nothing
needs `llama_batch_free` (which would free those pointers)."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import llama_cpp
import numpy as np


class TokenBatch:
    """Up to `capacity` tokens, each of one sequence, at its own position."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.tokens = np.zeros(capacity, dtype=np.int32)
        self.positions = np.zeros(capacity, dtype=np.int32)
        self.seq_ids = np.zeros(capacity, dtype=np.int32)
        self.wants_logits = np.zeros(capacity, dtype=np.int8)
        self._num_seq_ids = np.ones(capacity, dtype=np.int32)
        item = ctypes.sizeof(ctypes.c_int32)
        base = self.seq_ids.ctypes.data
        self._seq_pointers = (ctypes.POINTER(llama_cpp.llama_seq_id) * capacity)(
            *(
                ctypes.cast(base + i * item, ctypes.POINTER(llama_cpp.llama_seq_id))
                for i in range(capacity)
            )
        )
        self.size = 0
        self.num_outputs = 0

    def clear(self) -> None:
        self.size = 0
        self.num_outputs = 0

    def add(self, tokens: Sequence[int], *, seq_id: int, start: int, logits_last: bool) -> None:
        """`tokens` of sequence `seq_id` at positions start, start+1, ...; logits for the last one
        if `logits_last`."""
        n, end = len(tokens), self.size + len(tokens)
        assert end <= self.capacity, f"{end} tokens in a batch of {self.capacity}"
        self.tokens[self.size : end] = tokens
        self.positions[self.size : end] = np.arange(start, start + n, dtype=np.int32)
        self.seq_ids[self.size : end] = seq_id
        self.wants_logits[self.size : end] = 0
        if logits_last:
            self.wants_logits[end - 1] = 1
            self.num_outputs += 1
        self.size = end

    def add_one_each(
        self, tokens: Sequence[int], *, seq_ids: Sequence[int], positions: Sequence[int]
    ) -> None:
        """One token for each of several sequences, each with its logits (a decode step)."""
        n, end = len(tokens), self.size + len(tokens)
        assert end <= self.capacity, f"{end} tokens in a batch of {self.capacity}"
        self.tokens[self.size : end] = tokens
        self.positions[self.size : end] = positions
        self.seq_ids[self.size : end] = seq_ids
        self.wants_logits[self.size : end] = 1
        self.num_outputs += n
        self.size = end

    def as_llama_batch(self) -> llama_cpp.llama_batch:
        return llama_cpp.llama_batch(
            n_tokens=self.size,
            token=self.tokens.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token)),
            embd=None,
            pos=self.positions.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_pos)),
            n_seq_id=self._num_seq_ids.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
            seq_id=self._seq_pointers,
            logits=self.wants_logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)),
        )

"""The KV pool: one key and one value tensor per layer, in blocks, and how big to make it."""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from chatqueue.engine.hf.kv_batch import UnsupportedCache

DEFAULT_POOL_SHARE = 0.25  # of free memory, at most, when no size is given
DEFAULT_TOKENS_A_SLOT = 4096  # a full context for each of max_concurrent, up to this many tokens


@dataclass(frozen=True, slots=True)
class KVShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * itemsize

    @classmethod
    def of(cls, model: PreTrainedModel) -> KVShape:
        config = model.config.get_text_config(decoder=True)
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return cls(config.num_hidden_layers, kv_heads, head_dim, model.dtype)


class KVPool:
    """Per layer, keys and values as [kv_heads, blocks * block_size, head_dim]: token slot
    `block * block_size + offset` of every head. Two extra blocks at the end: the null block
    stays zero (rows shorter than the longest in a packed decode batch are padded with it), and
    the scratch block takes what idle rows of a captured decode step write.

    NOTE: why this layout. A decode step gathers each row's blocks along dim 1 and views them as
    [rows, kv_heads, tokens, head_dim] with every (row, head) run of tokens contiguous, which is
    what SDPA reads fastest; a step's new tokens are written with one `index_copy_` per tensor.
    Zeroed, not left empty: a masked slot still meets a zero weight, and 0 * NaN is NaN."""

    def __init__(
        self, shape: KVShape, *, num_blocks: int, block_size: int, device: torch.device
    ) -> None:
        self.shape = shape
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.null_block = num_blocks
        self.scratch_block = num_blocks + 1
        slots = (num_blocks + 2) * block_size
        size = (shape.num_kv_heads, slots, shape.head_dim)
        self.keys = [
            torch.zeros(size, dtype=shape.dtype, device=device) for _ in range(shape.num_layers)
        ]
        self.values = [
            torch.zeros(size, dtype=shape.dtype, device=device) for _ in range(shape.num_layers)
        ]

    def write(
        self, layer: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
    ) -> None:
        """keys, values: [kv_heads, tokens, head_dim], one token a slot."""
        self.keys[layer].index_copy_(1, slots, keys)
        self.values[layer].index_copy_(1, slots, values)

    def gather(
        self, layer: int, blocks: torch.Tensor, rows: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`blocks`: [rows * n] block ids, row-major -> keys, values [rows, kv_heads, n * block_size, head_dim]."""
        return self._gather(self.keys[layer], blocks, rows), self._gather(
            self.values[layer], blocks, rows
        )

    def _gather(self, pool: torch.Tensor, blocks: torch.Tensor, rows: int) -> torch.Tensor:
        return gather_blocks(pool, blocks, rows, self.block_size)


def gather_blocks(
    pool: torch.Tensor, blocks: torch.Tensor, rows: int, block_size: int
) -> torch.Tensor:
    """A layer's keys or values [kv_heads, slots, head_dim] read through `blocks` ([rows * n]
    block ids, row-major) -> [rows, kv_heads, n * block_size, head_dim]."""
    heads, _, dim = pool.shape
    by_block = pool.view(heads, -1, block_size, dim)
    picked = by_block.index_select(1, blocks)  # [heads, rows * n, block_size, dim]
    return picked.view(heads, rows, -1, dim).transpose(0, 1)


def num_blocks_for(
    model: PreTrainedModel,
    *,
    block_size: int,
    blocks: int | None,
    memory: int | float | None,
    max_concurrent: int,
    context_window: int,
) -> int:
    """The pool's blocks: `blocks` if given; else `memory` bytes (an int) or that share of the
    free memory (a float); else a full context (up to 4096 tokens) for each of `max_concurrent`
    sequences, within a quarter of the free memory."""
    if blocks is not None:
        return blocks
    per_block = KVShape.of(model).bytes_per_token * block_size
    if isinstance(memory, int):
        return max(1, memory // per_block)
    free = free_memory(model.device)
    if isinstance(memory, float):
        return max(1, int(free * memory) // per_block)
    wanted = max_concurrent * min(context_window, DEFAULT_TOKENS_A_SLOT)
    return max(1, min(-(-wanted // block_size), int(free * DEFAULT_POOL_SHARE) // per_block))


def free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def check_paged_supported(model: PreTrainedModel) -> None:
    """Raise UnsupportedCache unless every layer is attention the paged attention can stand in
    for (per-token positions): full attention or sliding windows, scores soft-capped or not
    (the model's forward with the decode rows packed in, whose attention function applies both,
    and the decode step apart and its packed step, whose kernels do)."""
    config = model.config.get_text_config(decoder=True)
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if not kinds <= {"full_attention", "sliding_attention"}:
        raise UnsupportedCache(f"layer types {sorted(kinds)}: not paged")
    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        raise UnsupportedCache("the model cannot keep the logits of chosen positions only")

"""The decode rows of the paged runner as one compiled step, captured as CUDA graphs: the family's
decode step (`static/decode.py`) reading and writing the KV pool through block tables.

NOTE: how. A captured graph replays fixed buffers, so the step reads its rows from buffers
written before each replay: every row's next token, its position and its block table (a row of
`max_len / block_size` block ids). Once a step (`spans`), each row's slot for its new token's KV
is looked up in its table; each layer then writes there and attends to the row's positions
[0, position] (or the last W of them in a sliding-window layer) through its table: a Triton
kernel on CUDA (`triton_decode.py`, the static cache's kernel reading through the table), else
the row's blocks gathered and SDPA under a mask. Rows of the graph's batch past the running ones
read and write the pool's scratch block only. A step with prompt tokens runs the same layers
over the decode rows and the prompt chunks packed together (`paged/packed.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from chatqueue.engine.hf.paged.pool import KVPool, gather_blocks
from chatqueue.engine.hf.static.attention import Span, attend_masked, triton_attention
from chatqueue.engine.hf.static.decode import DecodeStep, attention_scale
from chatqueue.engine.hf.static.families import plan_for
from chatqueue.engine.hf.static.graphs import DecodeGraphs


@dataclass(frozen=True, slots=True)
class DecodeOptions:
    """The decode step apart from prefill, for up to `max_batch` rows. `attention`: "triton"
    (CUDA), "sdpa", or "auto"; `compile` and `cuda_graphs`: None is on CUDA only;
    `compile_cache`: where compiled regions are kept for the next process."""

    max_batch: int
    attention: str = "auto"
    compile: bool | None = None
    cuda_graphs: bool | None = None
    compile_cache: Path | None = None


@dataclass(frozen=True, slots=True)
class DecodeRow:
    rid: int
    position: int  # of its pending token, whose KV this step writes
    blocks: Sequence[int]  # the sequence's own list, appended to as it grows


class PagedInputs:
    """The captured step's input buffers (see `StepInputs`), and their host copies.

    NOTE: what a step costs on the host. With the decode step a graph, what the host does
    between two replays is on the critical path (the step ends waiting for its tokens). A steady
    step copies only the rows' next tokens (device to device); the step itself moves each live
    row's position on (`live` is 1 for a running row, 0 for an idle one, which stays at position
    0). Tables and positions are written again only when the rows change: a sequence joins or
    leaves, or a row gets another block; a row's table only where it holds another block list
    or more of it."""

    def __init__(self, pool: KVPool, *, max_batch: int, max_len: int) -> None:
        device = pool.keys[0].device
        self.k, self.v = pool.keys, pool.values
        self.block_size = pool.block_size
        self.width = -(-max_len // pool.block_size)  # blocks a row's table holds
        self.ids = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.pos = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.live = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.table = torch.full(
            (max_batch, self.width), pool.scratch_block, dtype=torch.int32, device=device
        )
        pin = device.type == "cuda"
        self._host = torch.zeros(2, max_batch, dtype=torch.long, pin_memory=pin)  # pos, live
        self._table_host = torch.full(
            (max_batch, self.width), pool.scratch_block, dtype=torch.int32, pin_memory=pin
        )
        self._host_np, self._table_np = self._host.numpy(), self._table_host.numpy()
        self._scratch = pool.scratch_block
        # what each row's table holds: the row's block list (the object: a sequence resumed
        # after preemption comes back with a new one, its rid unchanged) and how many of them
        self._held: list[tuple[Sequence[int], int] | None] = [None] * max_batch

    def advance(self, b: int) -> None:
        self.pos.add_(self.live)

    def set_rows(self, rows: Sequence[DecodeRow]) -> None:
        """Rows [0, len(rows)) as given, the rest idle (position 0, the scratch block). Call it
        when the rows changed; their positions then move on with each step by themselves."""
        n = len(rows)
        # NOTE: through numpy's views of the host buffers, which take a list of ints several
        # times faster than `torch.tensor` (`PackedInputs.write`)
        table, held, host = self._table_np, self._held, self._host_np
        for r, row in enumerate(rows):
            assert len(row.blocks) <= self.width, f"{len(row.blocks)} blocks for one row"
            was = held[r]
            if was is None or was[0] is not row.blocks or was[1] != len(row.blocks):
                table[r, : len(row.blocks)] = row.blocks
                held[r] = (row.blocks, len(row.blocks))
        for r in range(n, len(held)):
            if held[r] is not None:
                table[r] = self._scratch
                held[r] = None
        host[:] = 0
        host[0, :n] = [row.position for row in rows]
        host[1, :n] = 1
        # NOTE: the host buffers are not written again before these copies ran: every step
        # waits for its sampled tokens
        self.pos.copy_(self._host[0], non_blocking=True)
        self.live.copy_(self._host[1], non_blocking=True)
        self.table.copy_(self._table_host, non_blocking=True)

    def grow(self, rows: Sequence[tuple[int, Sequence[int]]]) -> bool:
        """Rows whose block lists (the same objects `set_rows` saw) got more blocks: only the
        new entries are written. False, writing nothing, where a row's table holds another list
        (then `set_rows`)."""
        held = self._held
        if any((was := held[r]) is None or was[0] is not blocks for r, blocks in rows):
            return False
        at: list[list[int]] = [[], [], []]  # row, column, block
        for r, blocks in rows:
            assert len(blocks) <= self.width, f"{len(blocks)} blocks for one row"
            was = held[r]
            assert was is not None
            for column in range(was[1], len(blocks)):
                at[0].append(r)
                at[1].append(column)
                at[2].append(blocks[column])
            held[r] = (blocks, len(blocks))
        if at[0]:
            host = torch.tensor(at, dtype=torch.long)
            self._table_host[host[0], host[1]] = host[2].to(torch.int32)
            device = host.to(self.table.device)
            self.table[device[0], device[1]] = device[2].to(torch.int32)
        return True

    def reset(self) -> None:
        """Forget what capture wrote: every row idle."""
        self.pos.zero_()
        self.live.zero_()


class PagedDecodeAttention:
    """`StepAttention` over the pool: Triton through the block tables, or gather + SDPA."""

    def __init__(
        self,
        inputs: PagedInputs,
        *,
        block_size: int,
        choice: str,
        num_heads: int,
        scale: float,
        softcap: float | None,
        head_dim: int,
    ) -> None:
        self._inputs = inputs
        self._block_size = block_size
        self._num_heads = num_heads
        self._scale = scale
        self._softcap = softcap
        self._max_len = inputs.width * block_size
        device = inputs.pos.device
        self._columns = torch.arange(self._max_len, device=device)
        self.triton = triton_attention(choice, device, head_dim)
        # NOTE: the table's first blocks that hold every row's positions this step, where the
        # step is eager (no graph, no compiled code, whose shapes would change): the gather
        # then reads up to the longest row, not every row's whole table (4x the tokens/s of
        # reading it whole at 32 rows on a CPU). None: the whole table.
        self.read_blocks: int | None = None

    @property
    def kernel(self) -> str:
        if self.triton is not None:
            return "triton (paged)"
        return "gather + eager (soft-capped)" if self._softcap else "gather + sdpa"

    def spans(self, b: int, windows: Sequence[int | None]) -> dict[int | None, Span]:
        inputs, size = self._inputs, self._block_size
        pos, table = inputs.pos[:b], inputs.table[:b]
        if self.read_blocks is not None:
            table = table[:, : self.read_blocks]
        end = pos + 1
        block = table.gather(1, (pos // size).unsqueeze(1)).squeeze(1).long()
        slot = block * size + pos % size
        columns = self._columns[: table.shape[1] * size]
        spans = {}
        for window in windows:
            start = torch.zeros_like(pos) if window is None else (end - window).clamp_min(0)
            mask = None
            if self.triton is None:
                outside = (columns < start[:, None]) | (columns >= end[:, None])
                dtype = inputs.k[0].dtype
                mask = (outside.to(dtype) * torch.finfo(dtype).min).view(b, 1, 1, -1)
            spans[window] = Span(mask, start, table, end, slot)
        return spans

    def attend_into(
        self,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        *,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        span: Span,
    ) -> torch.Tensor:
        """As `SlotAttention.attend_into`, with k_cache, v_cache a layer of the pool."""
        assert span.slot is not None and span.table is not None
        b, kv_heads, dim = q.shape[0], k_cache.shape[0], k_cache.shape[2]
        q = q.reshape(b, kv_heads, self._num_heads // kv_heads, dim)
        if self.triton is not None:  # the kernel writes the new k, v itself
            assert span.start is not None and span.end is not None
            o: torch.Tensor = self.triton.paged_decode_attention(
                q,
                k_cache,
                v_cache,
                k,
                v,
                span.table,
                span.start,
                span.end,
                self._scale,
                self._softcap or 0.0,
                self._block_size,
            )
            return o
        write_kv_paged(k_cache, v_cache, k, v, span.slot)
        blocks, rows = span.table.flatten().long(), span.table.shape[0]
        keys = gather_blocks(k_cache, blocks, rows, self._block_size)
        values = gather_blocks(v_cache, blocks, rows, self._block_size)
        return attend_masked(q, keys, values, span.mask, self._scale, self._softcap)


@torch.library.custom_op("chatqueue::write_kv_paged", mutates_args=("k_pool", "v_pool"))
def write_kv_paged(
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot: torch.Tensor,
) -> None:
    """Rows' new key and value [b, KV, 1, D] into their slots of a layer's pool [KV, slots, D].
    An op of its own, as the static cache's `write_kv`: the write stays in place."""
    k_pool.index_copy_(1, slot, k[:, :, 0].transpose(0, 1))
    v_pool.index_copy_(1, slot, v[:, :, 0].transpose(0, 1))


@write_kv_paged.register_fake
def _(
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot: torch.Tensor,
) -> None:
    return None


class PagedDecode:
    """The paged runner's decode rows as one step: the family's compiled decode step over the
    pool, captured as CUDA graphs at a set of batch sizes."""

    def __init__(
        self, model: PreTrainedModel, pool: KVPool, *, max_len: int, options: DecodeOptions
    ) -> None:
        """Raises UnsupportedModel where the model's family has no decode step."""
        device = pool.keys[0].device
        plan = plan_for(model, max_len)
        self.inputs = PagedInputs(pool, max_batch=options.max_batch, max_len=max_len)
        self.attention = PagedDecodeAttention(
            self.inputs,
            block_size=pool.block_size,
            choice=options.attention,
            num_heads=plan.num_heads,
            scale=attention_scale(model, max_len),
            softcap=plan.attn_softcap,
            head_dim=plan.head_dim,
        )
        on_cuda = device.type == "cuda"
        graphs = on_cuda if options.cuda_graphs is None else options.cuda_graphs
        compiled = on_cuda if options.compile is None else options.compile
        self.step = DecodeStep(
            model,
            self.inputs,
            self.attention,
            max_len=max_len,
            compile=compiled,
            compile_cache=options.compile_cache,
        )
        self.graphs = DecodeGraphs(
            self.step.forward,
            max_batch=options.max_batch,
            smallest=2 if graphs or compiled else 1,
        )
        if graphs:
            self.graphs.capture()
            self.inputs.reset()
        self._eager = not graphs and not compiled
        self._longest = 0  # the longest row's end after the next step (eager only)

    @property
    def info(self) -> dict[str, Any]:
        return {
            "attention": self.attention.kernel,
            "compiled": self.step.compiled,
            "cuda_graph_batch_sizes": sorted(self.graphs.captured),
        }

    def set_rows(self, rows: Sequence[DecodeRow]) -> None:
        """The running rows, in order, when they change (see `PagedInputs`)."""
        self.inputs.set_rows(rows)
        self._longest = max(row.position for row in rows) + 1

    def grow(self, rows: Sequence[tuple[int, Sequence[int]]]) -> bool:
        """Rows (by index) whose blocks grew, nothing else changed (see `PagedInputs.grow`)."""
        return self.inputs.grow(rows)

    def run(self, pending: torch.Tensor) -> torch.Tensor:
        """Each row's pending token through the model: their logits [rows, vocab]."""
        n = pending.shape[0]
        self.inputs.ids[:n].copy_(pending)
        self._longest += 1
        if self._eager:  # exactly the rows there are, reading only the blocks they hold
            self.attention.read_blocks = -(-(self._longest - 1) // self.inputs.block_size)
            return self.step.forward(n)
        return self.graphs.run(n)[:n]

    def close(self) -> None:
        self.graphs.clear()

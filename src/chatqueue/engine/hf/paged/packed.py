"""A step with prompt tokens on the paged runner's fast path: the decode rows' next tokens and the
prompt chunks' tokens packed into one run, each token a row of the family's decode step
(`static/decode.py`: fused projections, compiled by region), attending through block tables.

NOTE: why. The decode rows alone run as a captured CUDA graph (`paged/decode.py`); a step with
prompt tokens cannot (its shapes change every step). It first went through the model's own
eager forward, whose thousand kernel launches and per-chunk attention made a step with four new
turns take 20-25 ms on an H100 beside a 1.8 ms decode step, and held the streams up (issue 14,
benchmarks/RESULTS.md). Here the same step runs the decode step's compiled regions, whose batch
dimension is already symbolic, over every token at once: a token is a row of one, at its own
position, its KV written to its slot; attention is one kernel a layer for all of them
(`triton_packed.py`: tiles of a sequence's consecutive tokens read its keys through its block
table, causal). Compiled regions alone still cost the host 0.4 ms a layer, so the step is
captured as CUDA graphs at a set of token counts, its tokens and tiles padded up to the count
(padding writes only the scratch block); the logits of the rows wanted come after the graph.
Where Triton cannot run (a CPU; then the step is eager), each sequence's blocks are gathered and
SDPA attends under a causal mask.

Every token's table row comes from `BlockTables`: one device row a sequence, written when its
blocks change, so a step copies only its tokens' ids, positions and slots and its tiles.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy
import torch
from transformers import PreTrainedModel

from chatqueue.engine.hf.paged.decode import write_kv_paged
from chatqueue.engine.hf.paged.pool import KVPool, gather_blocks
from chatqueue.engine.hf.static.attention import Span, attend_masked
from chatqueue.engine.hf.static.decode import DecodeStep, attention_scale
from chatqueue.engine.hf.static.families import plan_for
from chatqueue.engine.hf.static.graphs import DecodeGraphs


@dataclass(frozen=True, slots=True)
class Segment:
    """A sequence's tokens in a packed step: `count` tokens from position `begin`, their ids
    `ids` (None: a decode row, whose one token is pending on the device); `keep`: its last
    token's logits are wanted."""

    rid: int
    blocks: Sequence[int]  # the sequence's own list, appended to as it grows
    begin: int
    count: int
    ids: Sequence[int] | None
    keep: bool


class BlockTables:
    """Every sequence's block table on the device, one row a sequence, for the kernel to read.

    NOTE: rows are written when a sequence's block list changes (another list object: resumed
    after preemption; or more blocks in it), and the host copy goes over once for the step; a
    steady step copies nothing. The last row is all scratch block: a padding tile's."""

    def __init__(self, pool: KVPool, *, rows: int, width: int) -> None:
        self.width = width
        self._scratch = pool.scratch_block
        self._rows: dict[int, int] = {}  # rid -> row
        self._free = list(range(rows - 1, -1, -1))
        self._held: dict[int, tuple[Sequence[int], int]] = {}  # rid -> (its list, its length)
        self._host = torch.full((rows + 1, width), self._scratch, dtype=torch.int32)
        self.device = self._host.to(pool.keys[0].device)  # the same tensor for good: graphs
        self._dirty = False

    @property
    def pad_row(self) -> int:
        return self._host.shape[0] - 1

    def row(self, rid: int, blocks: Sequence[int]) -> int:
        """The sequence's row, written again where its blocks changed."""
        assert len(blocks) <= self.width, f"{len(blocks)} blocks for one sequence"
        row = self._rows.get(rid)
        if row is None:
            assert self._free, f"more than {self.pad_row} sequences at once"
            row = self._rows[rid] = self._free.pop()
        held = self._held.get(rid)
        if held is None or held[0] is not blocks or held[1] != len(blocks):
            self._host[row, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
            self._held[rid] = (blocks, len(blocks))
            self._dirty = True
        return row

    def release(self, rids: Sequence[int]) -> None:
        for rid in rids:
            row = self._rows.pop(rid, None)
            if row is not None:
                self._free.append(row)
            self._held.pop(rid, None)

    def sync(self) -> None:
        """The rows written since the last step onto the device."""
        if self._dirty:
            self.device.copy_(self._host)  # NOTE: not pinned: the copy is done when it returns
            self._dirty = False


class PackedInputs:
    """A packed step's buffers, for up to `most` tokens, written before each step and never
    replaced (captured graphs read them): per token its id, position and KV slot; per tile its
    first token, tokens and table row, and its last position + 1. Tokens and tiles past the
    step's are padding: token 0 at position 0 into the scratch block, tiles of no tokens."""

    def __init__(self, pool: KVPool, *, most: int, pad_row: int) -> None:
        self.k, self.v = pool.keys, pool.values
        device = pool.keys[0].device
        self.most = most
        # one buffer, one copy a step: ids, positions, slots, ends, then tiles [most, 3]
        self._pad = torch.zeros(7 * most, dtype=torch.long)
        self._pad[2 * most : 3 * most] = pool.scratch_block * pool.block_size
        self._pad[4 * most :].view(most, 3)[:, 2] = pad_row
        pin = device.type == "cuda"
        self._host = torch.empty(7 * most, dtype=torch.long, pin_memory=pin)
        self._host_np, self._pad_np = self._host.numpy(), self._pad.numpy()
        self._device = torch.empty(7 * most, dtype=torch.long, device=device)
        self.ids, self.pos, self.slot, self.end = self._device[: 4 * most].view(4, most)
        self.tiles = self._device[4 * most :].view(most, 3)

    def write(
        self,
        ids: Sequence[int],
        positions: Sequence[int],
        slots: Sequence[int],
        tiles: Sequence[int],
    ) -> None:
        """This step's tokens (`ids` those of its prompt tokens, after the decode rows') and
        tiles (first, count, row, end: four numbers a tile, flat) onto the device, the rest
        padding."""
        # NOTE: through numpy's view of the buffer, which takes a list of ints 3-4x faster than
        # `torch.tensor` (760 ints: 14 against 48 us), four times a step
        host, t, most = self._host_np, len(positions), self.most
        host[:] = self._pad_np
        host[t - len(ids) : t] = ids
        host[most : most + t] = positions
        host[2 * most : 2 * most + t] = slots
        if tiles:
            described = numpy.array(tiles, dtype=numpy.int64).reshape(-1, 4)
            host[3 * most : 3 * most + len(described)] = described[:, 3]
            host[4 * most :].reshape(most, 3)[: len(described)] = described[:, :3]
        # NOTE: the host buffer is not written again before this copy ran: every step waits for
        # its sampled tokens
        self._device.copy_(self._host, non_blocking=True)

    def advance(self, b: int) -> None:
        """Nothing: a packed step's positions are given anew each step."""


class PackedAttention:
    """`StepAttention` for a packed step: every token over its own sequence's positions up to
    its own (the last W of them in a sliding-window layer), through the block tables (Triton),
    or each sequence's blocks gathered and attended under a causal mask (eager)."""

    def __init__(
        self,
        inputs: PackedInputs,
        tables: BlockTables,
        *,
        block_size: int,
        num_heads: int,
        scale: float,
        kernel: Any,
        softcap: float | None = None,
    ) -> None:
        """`kernel`: the `triton_packed` module, or None for the eager path. `softcap`: scores
        soft-capped with tanh (Gemma2)."""
        self.triton = kernel
        self._inputs = inputs
        self._tables = tables
        self._block_size = block_size
        self._num_heads = num_heads
        self._scale = scale
        self._softcap = softcap
        self.segments: list[tuple[int, int, int, torch.Tensor]] = []  # eager: first, n, end, blocks

    @property
    def kernel(self) -> str:
        if self.triton is not None:
            return "triton (packed, paged)"
        return "gather + eager (causal, soft-capped)" if self._softcap else "gather + sdpa (causal)"

    def spans(self, b: int, windows: Sequence[int | None]) -> dict[int | None, Span]:
        inputs = self._inputs
        # a step of b tokens has at most b tiles; the kernel applies each layer's window itself
        tiles, end, slot = inputs.tiles[:b], inputs.end[:b], inputs.slot[:b]
        table = self._tables.device
        return {w: Span(None, tiles, table, end, slot, window=w) for w in windows}

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
        """Every token's key and value into its slot, then every token attends: [T, KV, G, D]."""
        assert span.slot is not None
        write_kv_paged(k_cache, v_cache, k, v, span.slot)
        t, kv_heads, dim = q.shape[0], k_cache.shape[0], k_cache.shape[2]
        q = q.reshape(t, kv_heads, self._num_heads // kv_heads, dim)
        if self.triton is not None:
            assert span.start is not None and span.end is not None and span.table is not None
            out: torch.Tensor = self.triton.packed_attention(
                q,
                k_cache,
                v_cache,
                span.start,
                span.end,
                span.table,
                self._block_size,
                self._scale,
                self._softcap or 0.0,
                span.window or 0,
            )
            return out
        parts = []
        groups = q.shape[2]
        for first, n, end, blocks in self.segments:
            keys = gather_blocks(k_cache, blocks, 1, self._block_size)[:, :, :end]
            values = gather_blocks(v_cache, blocks, 1, self._block_size)[:, :, :end]
            key_at = torch.arange(end, device=q.device)
            query_at = torch.arange(end - n, end, device=q.device).unsqueeze(1)
            seen = key_at <= query_at  # [n, end]
            if span.window is not None:  # key k seen by query q where k > q - W
                seen &= key_at > query_at - span.window
            # the tokens' queries grouped by KV head: [1, KV, n * G, D], a mask row for each
            queries = q[first : first + n].transpose(0, 1).reshape(1, kv_heads, n * groups, dim)
            hidden = (~seen).repeat_interleave(groups, 0).to(q.dtype) * torch.finfo(q.dtype).min
            attended = attend_masked(
                queries,
                keys,
                values,
                hidden.view(1, 1, n * groups, end),
                self._scale,
                self._softcap,
            )  # [1, KV, n * G, D]
            parts.append(attended[0].view(kv_heads, n, groups, dim).transpose(0, 1))
        return torch.cat(parts)


class PackedStep:
    """Steps with prompt tokens: the decode rows and prompt chunks as one run through the family's
    decode step (`decode`, whose fused weights it reads), compiled by region as the decode step
    apart is, and captured as CUDA graphs at a set of token counts, the logits of the rows
    wanted taken after the graph."""

    def __init__(
        self,
        model: PreTrainedModel,
        pool: KVPool,
        decode: DecodeStep,
        *,
        max_len: int,
        max_rows: int,
        most_tokens: int,
        kernel: Any,
        cuda_graphs: bool,
    ) -> None:
        """`max_rows`: sequences at once; `most_tokens`: tokens a step; `kernel`: the
        `triton_packed` module, or None (eager only: compiled or graphed steps need it)."""
        plan = plan_for(model, max_len)
        self._pool = pool
        self._block_size = pool.block_size
        self.tables = BlockTables(pool, rows=max_rows, width=-(-max_len // pool.block_size))
        self.inputs = PackedInputs(pool, most=most_tokens, pad_row=self.tables.pad_row)
        self.attention = PackedAttention(
            self.inputs,
            self.tables,
            block_size=pool.block_size,
            num_heads=plan.num_heads,
            scale=attention_scale(model, max_len),
            kernel=kernel,
            softcap=plan.attn_softcap,
        )
        self._per_tile = 1
        if kernel is not None:
            self._per_tile = kernel.tokens_a_tile(plan.num_heads // plan.num_kv_heads)
        # NOTE: without the kernel, attention loops over the step's sequences on the host, which
        # neither a compiled region nor a graph can hold
        assert kernel is not None or not (decode.compiled or cuda_graphs), "eager without Triton"
        self.step = DecodeStep(
            model,
            self.inputs,
            self.attention,
            max_len=max_len,
            compile=decode.compiled,
            compile_cache=decode.compile_cache,
            fused_by=decode,
        )
        self._eager = not decode.compiled and not cuda_graphs
        self.graphs = DecodeGraphs(
            self._layers, max_batch=most_tokens, buckets=_TOKEN_BUCKETS, what="packed step"
        )
        if cuda_graphs:
            self.inputs.write([], [], [], [])  # every token padding
            self.graphs.capture()
        self._pad_keep = decode.compiled  # Dynamo's sizes >= 2 for the kept rows too
        if decode.compiled:
            self._compile_end()

    def _compile_end(self) -> None:
        """The logits of kept rows, a region no capture runs, compiled (or loaded) now: else the
        first step with a prompt paid for it (568 ms on an H100), which the prefill budget
        read as the cost of its tokens. Padding only, as the capture writes."""
        smallest = self.graphs.buckets[0]
        self.inputs.write([], [], [], [])
        with torch.inference_mode():
            residual = self.graphs.run(smallest)  # compiled: never the eager path
            self.step.logits(residual[:smallest], None, self._tensor([0, 1]))

    @property
    def info(self) -> dict[str, Any]:
        return {
            "attention": self.attention.kernel,
            "compiled": self.step.compiled,
            "cuda_graph_token_counts": sorted(self.graphs.captured),
        }

    def release(self, rids: Sequence[int]) -> None:
        self.tables.release(rids)

    def run(self, pending: torch.Tensor, segments: Sequence[Segment]) -> torch.Tensor:
        """The decode rows' `pending` tokens (their segments first, in order) and the prompt
        chunks through the model: the logits [kept, vocab] of each segment kept, in order."""
        first, decoding, keep = self._layout(segments)
        kept = len(keep)
        if self._pad_keep and kept < 2:
            keep += [0] * (2 - kept)
        self.inputs.ids[:decoding].copy_(pending[:decoding])
        if self.attention.triton is None:
            self.attention.segments = self._eager_segments(segments)
        residual = self._layers(first) if self._eager else self.graphs.run(first)
        logits = self.step.logits(residual[:first], None, self._tensor(keep))
        return logits[:kept]

    def _layout(self, segments: Sequence[Segment]) -> tuple[int, int, list[int]]:
        """The step's tokens (ids, positions, KV slots) and tiles onto the device, its table rows
        synced: (tokens, decode rows, the tokens whose logits are kept). NOTE: on the host
        before the graph runs, so in every step's time: a decode row (one token, a tile of its
        own) goes by a path of its own, and tiles as one flat list (with `PackedInputs.write`,
        160 rows and four turns of 150 tokens: 0.45-0.83 -> 0.29-0.31 ms on a 2-vCPU EPYC)."""
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        tiles: list[int] = []  # (first, count, row, end) a tile, flat
        keep: list[int] = []
        size, per_tile, row_of = self._block_size, self._per_tile, self.tables.row
        first = decoding = 0
        for seg in segments:
            begin, blocks = seg.begin, seg.blocks
            if seg.ids is None:  # a decode row: its one pending token
                decoding += 1
                slots.append(blocks[begin // size] * size + begin % size)
                positions.append(begin)
                tiles += (first, 1, row_of(seg.rid, blocks), begin + 1)
                first += 1
                if seg.keep:
                    keep.append(first - 1)
                continue
            n, row = seg.count, row_of(seg.rid, blocks)
            ids += seg.ids
            slots += [blocks[p // size] * size + p % size for p in range(begin, begin + n)]
            positions += range(begin, begin + n)
            for at in range(0, n, per_tile):
                took = min(per_tile, n - at)
                tiles += (first + at, took, row, begin + at + took)
            first += n
            if seg.keep:
                keep.append(first - 1)
        assert first <= self.inputs.most, f"{first} tokens in a step of at most {self.inputs.most}"
        self.tables.sync()
        self.inputs.write(ids, positions, slots, tiles)
        return first, decoding, keep

    def _eager_segments(
        self, segments: Sequence[Segment]
    ) -> list[tuple[int, int, int, torch.Tensor]]:
        """Without the kernel: each segment's (first token, tokens, last position + 1, blocks)."""
        eager, first = [], 0
        for seg in segments:
            end = seg.begin + seg.count
            eager.append(
                (first, seg.count, end, self._tensor(seg.blocks[: -(-end // self._block_size)]))
            )
            first += seg.count
        return eager

    def _layers(self, b: int) -> torch.Tensor:
        """Tokens [0, b) through every layer: the last residual stream (capturable)."""
        hidden, delta = self.step.layers(b)
        return hidden if delta is None else hidden + delta

    def _tensor(self, values: Sequence[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).to(self._pool.keys[0].device)


# the token counts of a packed step captured as graphs (and the most a step holds). NOTE: 16
# at least: Dynamo compiles sizes 0 and 1 apart, and a step of fewer tokens costs the same
_TOKEN_BUCKETS = (16, 32, 64, 96, 128, 192, 256, 320, 384, 448, 512, 640, 768, 896, 1024)

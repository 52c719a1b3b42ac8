"""Continuous batching over a paged KV pool: any transformers causal LM whose layers are full
attention or sliding windows, on the CPU or a GPU.

NOTE: a step. Blocks come from the scheduler (its BlockManager is the truth it admits by): a new
sequence arrives with its block table and the number of leading tokens whose KV those blocks
hold already (a cached prefix: another request's, or this conversation's earlier turns), and
only the rest of its prompt is prefilled; a running one gets a block appended when it crosses a
block boundary. Each step runs one forward over the decode rows' pending tokens and up to
`prefill_chunk` prompt tokens (a long prompt goes through in chunks, one a step, beside the
decode), fewer while streams decode where the step would outlast `prefill_stall_limit` decode
steps (`engine/prefill_budget.py`), so a long prompt holds the running streams up by one bounded
chunk at most. A sequence whose
prompt is done samples its first token there and decodes from the next step on.

With `decode` options (on a GPU, the loader's choice) a step of decode rows alone runs the model
family's compiled decode step captured as CUDA graphs (`paged/decode.py`); a step with prompt
tokens runs the decode rows and the prompt chunks packed together through the same compiled
layers (`paged/packed.py`), or, where that cannot run (compiled without Triton), the prompt
chunks through the model's own forward after the graphed decode rows.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from transformers import PreTrainedModel

from chatqueue.engine.hf.kv_batch import UnsupportedCache
from chatqueue.engine.hf.paged.attention import (
    NAME,
    STEP_KWARG,
    PagedStep,
    PrefillChunk,
    causal_after,
)
from chatqueue.engine.hf.paged.decode import DecodeOptions, DecodeRow, PagedDecode
from chatqueue.engine.hf.paged.packed import PackedStep, Segment
from chatqueue.engine.hf.paged.pool import KVPool, KVShape, check_paged_supported
from chatqueue.engine.hf.sampling import Sampled, SamplingBatch, SamplingRequest, step_output
from chatqueue.engine.prefill_budget import PrefillBudget
from chatqueue.engine.runner import KVSpec, NewSequence, StepBatch, StepOutput, row_masks


@dataclass(eq=False, slots=True)
class _Seq:
    new: NewSequence
    blocks: list[int]
    num_computed: int  # leading tokens whose KV is in the pool

    @property
    def rid(self) -> int:
        return self.new.rid

    @property
    def num_prompt(self) -> int:
        return len(self.new.prompt_ids)


@dataclass(frozen=True, slots=True)
class _Chunk:
    seq: _Seq
    end: int  # the sequence's tokens up to here go through this step


class HFPagedRunner:
    """A ModelRunner with a KV pool of `num_blocks` blocks of `block_size` tokens."""

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        num_blocks: int,
        block_size: int = 16,
        prefill_chunk: int = 512,
        prefix_caching: bool = True,
        context_window: int | None = None,
        prefill_stall_limit: float | None = None,
        decode: DecodeOptions | None = None,
    ) -> None:
        """`decode`: the decode rows through a compiled, graphed step apart from prefill (its
        sequences at most `context_window` tokens long, which then must be given); None: packed
        with the prompts into the model's own forward. Raises UnsupportedCache (the model's
        layers) or UnsupportedModel (its family has no decode step)."""
        check_paged_supported(model)
        self.model = model
        self.device = model.device
        self.prefill_chunk = prefill_chunk
        self._budget = PrefillBudget(prefill_chunk, prefill_stall_limit)
        self.pool = KVPool(
            KVShape.of(model), num_blocks=num_blocks, block_size=block_size, device=self.device
        )
        name = getattr(model.config, "name_or_path", "") or type(model).__name__
        self._kv_spec = KVSpec(num_blocks, block_size, f"{name} {model.dtype}", prefix_caching)
        self._context_window = context_window or _context_window_of(model)
        self._seqs: dict[int, _Seq] = {}
        self._prefilling: list[_Seq] = []  # in arrival order
        self._decoding: list[_Seq] = []  # one row each in `_sampling` and `_pending`, same order
        self._sampling: SamplingBatch | None = None
        self._pending = torch.empty(0, dtype=torch.long, device=self.device)  # sampled, not in KV
        self._check_attention_is_ours()
        self._decode: PagedDecode | None = None
        self._packed: PackedStep | None = None
        self._rows_changed = True  # the decode rows or their blocks, since the step last ran
        if decode is not None:
            assert context_window is not None, "a decode step needs the longest sequence"
            self._decode = PagedDecode(model, self.pool, max_len=context_window, options=decode)
            self._packed = _packed_step(
                model,
                self.pool,
                self._decode,
                max_len=context_window,
                max_rows=decode.max_batch,
                most_tokens=decode.max_batch + prefill_chunk,
            )

    # -- the ModelRunner contract ---------------------------------------------------------
    @property
    def context_window(self) -> int:
        return self._context_window

    @property
    def kv_spec(self) -> KVSpec:
        return self._kv_spec

    @property
    def info(self) -> dict[str, Any]:
        """What was chosen, for the start-up log and /v1/models."""
        spec, config, decode = self._kv_spec, self.model.config, self._decode
        if decode is None:
            runner, attention, graphs = (
                "paged (continuous batching, prefix reuse)",
                "paged SDPA",
                [],
            )
        else:
            runner = "paged (continuous batching, prefix reuse, a decode step apart)"
            prompts = "paged SDPA" if self._packed is None else self._packed.info["attention"]
            attention = f"decode {decode.info['attention']}, steps with prompts {prompts}"
            graphs = decode.info["cuda_graph_batch_sizes"]
        return {
            "runner": runner,
            "model_type": config.model_type,
            "attention": f"{attention} through block tables",
            "cache": {
                "layout": "a pool of KV blocks a layer, block tables per sequence",
                "blocks": spec.num_blocks,
                "block_size": spec.block_size,
                "prefix_caching": spec.prefix_caching,
                "bytes": sum(t.nbytes for t in (*self.pool.keys, *self.pool.values)),
            },
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "cuda_graph_batch_sizes": graphs,
            "packed_step": None if self._packed is None else self._packed.info,
            "prefill": {"chunk": self.prefill_chunk, "stall_limit": self._budget.stall_limit},
        }

    def step(self, batch: StepBatch) -> StepOutput:
        self._release(batch.released)
        self._grow(batch.grown)
        assert sorted(self._seqs) == sorted(batch.running), (
            f"running {sorted(batch.running)} != sequences held {sorted(self._seqs)}"
        )
        for new in batch.new:
            self._join(new)
        chunks = self._plan_prefill()
        decode_rows = len(self._decoding)
        if not decode_rows and not chunks:
            return StepOutput({})
        prompt_tokens = sum(chunk.end - chunk.seq.num_computed for chunk in chunks)
        began = time.perf_counter()
        with torch.inference_mode():
            logits = self._logits(chunks)
            output = step_output(self._sample(logits, chunks, batch))  # the tokens: synced
        self._budget.observe(
            time.perf_counter() - began, decode_rows=decode_rows, prompt_tokens=prompt_tokens
        )
        return replace(output, prefill=self._budget.describe())

    def close(self) -> None:
        device = self.device
        if self._decode is not None:
            self._decode.close()
            self._decode = None
        del self.pool
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # -- the phases of a step -------------------------------------------------------------
    def _release(self, released: Sequence[int]) -> None:
        gone = {rid for rid in released if self._seqs.pop(rid, None) is not None}
        if not gone:
            return
        if self._packed is not None:
            self._packed.release(list(gone))
        self._prefilling = [s for s in self._prefilling if s.rid not in gone]
        keep = _filled_from_tail(self._decoding, gone)
        if len(keep) < len(self._decoding):
            self._rows_changed = True
            self._decoding = [self._decoding[row] for row in keep]
            index = torch.tensor(keep, dtype=torch.long, device=self.device)
            self._pending = self._pending.index_select(0, index)
            assert self._sampling is not None
            self._sampling = self._sampling.select(keep) if keep else None

    def _grow(self, grown: Mapping[int, Sequence[int]]) -> None:
        """Blocks appended to running sequences. Where the decode rows are otherwise as the
        step apart last saw them, only the grown rows' new table entries are written (a few
        rows a step, where all of them were written again: 0.3 ms of host time at 256 rows)."""
        for rid, added in grown.items():
            self._seqs[rid].blocks.extend(added)
        if not grown or self._decode is None or self._rows_changed:
            self._rows_changed = self._rows_changed or bool(grown)
            return
        rows = [(row, s.blocks) for row, s in enumerate(self._decoding) if s.rid in grown]
        if rows and not self._decode.grow(rows):
            self._rows_changed = True

    def _join(self, new: NewSequence) -> None:
        assert new.rid not in self._seqs, f"sequence {new.rid} is already running"
        block_size = self.pool.block_size
        assert len(new.block_table) * block_size >= len(new.prompt_ids), "too few blocks"
        cached = new.num_cached_tokens if self._kv_spec.prefix_caching else 0
        assert cached < len(new.prompt_ids)
        seq = _Seq(new, list(new.block_table), cached)
        self._seqs[new.rid] = seq
        self._prefilling.append(seq)

    def _plan_prefill(self) -> list[_Chunk]:
        """This step's prompt tokens: whole prompts and at most one partial chunk, in order,
        `prefill_chunk` tokens in all, fewer while streams decode (`PrefillBudget`)."""
        budget = self._budget.tokens(decoding=len(self._decoding), waiting=len(self._prefilling))
        chunks: list[_Chunk] = []
        for seq in self._prefilling:
            if budget <= 0:
                break
            end = min(seq.num_prompt, seq.num_computed + budget)
            budget -= end - seq.num_computed
            chunks.append(_Chunk(seq, end))
        return chunks

    def _logits(self, chunks: list[_Chunk]) -> torch.Tensor:
        """The logits of each decode row, then of each prompt's last token (those that end in
        this step's chunks)."""
        if self._decode is None:
            return self._forward(chunks, self._decoding)
        if chunks and self._packed is not None:
            self._rows_changed = True  # the graph's positions did not move on with this step
            return self._packed.run(self._pending, self._segments(chunks))
        parts = []
        if self._decoding:
            if self._rows_changed:
                rows = [DecodeRow(s.rid, s.num_computed, s.blocks) for s in self._decoding]
                self._decode.set_rows(rows)
                self._rows_changed = False
            parts.append(self._decode.run(self._pending))
        if chunks:
            parts.append(self._forward(chunks, []).float())
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _forward(self, chunks: list[_Chunk], decoding: list[_Seq]) -> torch.Tensor:
        """One forward over `decoding`'s pending tokens and the prefill chunks, packed in one
        row; the logits of each decode row and of each prompt's last token (for those that end
        here)."""
        positions = [s.num_computed for s in decoding]
        slots = [
            slot for s in decoding for slot in self._slots(s, s.num_computed, s.num_computed + 1)
        ]
        prompt_ids: list[int] = []
        step = PagedStep(pool=self.pool, slots=self.pool.keys[0].new_empty(0, dtype=torch.long))
        keep = list(range(len(decoding)))
        if decoding:
            self._describe_decode(step, decoding)
        start = len(decoding)
        for chunk in chunks:
            seq, begin = chunk.seq, chunk.seq.num_computed
            prompt_ids += seq.new.prompt_ids[begin : chunk.end]
            positions += range(begin, chunk.end)
            slots += self._slots(seq, begin, chunk.end)
            step.prefills.append(
                PrefillChunk(
                    start=start,
                    end=start + chunk.end - begin,
                    num_before=begin,
                    blocks=self._tensor(seq.blocks[: self._blocks_for(chunk.end)]),
                    seen=causal_after(begin, chunk.end - begin, self.device) if begin else None,
                )
            )
            start += chunk.end - begin
            if chunk.end == seq.num_prompt:
                keep.append(start - 1)
        step.slots = self._tensor(slots)
        pending = self._pending if decoding else self._pending[:0]
        input_ids = torch.cat([pending, self._tensor(prompt_ids)]).unsqueeze(0)
        with self._paged_attention():
            output = self.model(
                input_ids=input_ids,
                position_ids=self._tensor(positions).unsqueeze(0),
                use_cache=False,
                logits_to_keep=self._tensor(keep),
                **{STEP_KWARG: step},
            )
        logits: torch.Tensor = output.logits[0]
        return logits

    def _segments(self, chunks: list[_Chunk]) -> list[Segment]:
        """The decode rows, then the prompt chunks, for the packed step."""
        segments = [Segment(s.rid, s.blocks, s.num_computed, 1, None, True) for s in self._decoding]
        for chunk in chunks:
            seq, begin = chunk.seq, chunk.seq.num_computed
            ids = seq.new.prompt_ids[begin : chunk.end]
            segments.append(
                Segment(
                    seq.rid, seq.blocks, begin, chunk.end - begin, ids, chunk.end == seq.num_prompt
                )
            )
        return segments

    def _describe_decode(self, step: PagedStep, decoding: list[_Seq]) -> None:
        block_size = self.pool.block_size
        lengths = [s.num_computed + 1 for s in decoding]  # the pending token's KV too
        width = self._blocks_for(max(lengths))
        padded = [
            s.blocks[: self._blocks_for(n)] + [self.pool.null_block] * (width - self._blocks_for(n))
            for s, n in zip(decoding, lengths, strict=True)
        ]
        step.num_decode = len(decoding)
        step.decode_blocks = self._tensor([b for row in padded for b in row])
        columns = torch.arange(width * block_size, device=self.device)
        step.decode_lengths = self._tensor(lengths)
        step.decode_mask = (columns.unsqueeze(0) < step.decode_lengths.unsqueeze(1)).view(
            len(decoding), 1, 1, -1
        )

    def _slots(self, seq: _Seq, begin: int, end: int) -> list[int]:
        """Where the KV of `seq`'s tokens begin..end-1 goes: its blocks, by position."""
        size, blocks = self.pool.block_size, seq.blocks
        return [blocks[p // size] * size + p % size for p in range(begin, end)]

    def _sample(
        self, logits: torch.Tensor, chunks: list[_Chunk], batch: StepBatch
    ) -> list[tuple[list[int], Sampled]]:
        """Decode rows sample from their rows; prompts that ended sample their first token and
        join the decode rows. Every packed token's KV is now in the pool."""
        parts: list[tuple[list[int], Sampled]] = []
        rows = len(self._decoding)
        if rows:
            assert self._sampling is not None
            rids = [s.rid for s in self._decoding]
            sampled = self._sampling.sample(logits[:rows], masks=row_masks(batch, rids))
            parts.append((rids, sampled))
            self._pending = sampled.tokens
            for seq in self._decoding:
                seq.num_computed += 1
        done = []
        for chunk in chunks:
            chunk.seq.num_computed = chunk.end
            if chunk.end == chunk.seq.num_prompt:
                done.append(chunk.seq)
        self._prefilling = [s for s in self._prefilling if s not in done]
        if done:
            requests = [_sampling_request(s.new) for s in done]
            joining = SamplingBatch.create(
                requests, vocab_size=logits.shape[-1], device=self.device
            )
            rids = [s.rid for s in done]
            sampled = joining.sample(logits[rows:], masks=row_masks(batch, rids))
            parts.append((rids, sampled))
            self._decoding = self._decoding + done
            self._rows_changed = True
            self._pending = torch.cat([self._pending, sampled.tokens])
            self._sampling = joining if self._sampling is None else self._sampling.concat(joining)
        return parts

    def _check_attention_is_ours(self) -> None:
        """A model whose layers do not attend through transformers' attention interface would
        ignore the pool and answer nonsense: refuse it at load, with a reason. Two tokens go
        through into the zero block's slots, which are zeroed again after."""
        pool, size = self.pool, self.pool.block_size
        slots = torch.arange(2, device=self.device) % size + pool.null_block * size
        step = PagedStep(pool=pool, slots=slots)
        step.prefills.append(PrefillChunk(0, 2, 0, self._tensor([pool.null_block])))
        with torch.inference_mode(), self._paged_attention():
            self.model(
                input_ids=torch.ones(1, 2, dtype=torch.long, device=self.device),
                position_ids=torch.arange(2, device=self.device).unsqueeze(0),
                use_cache=False,
                logits_to_keep=1,
                **{STEP_KWARG: step},
            )
            for tensor in (*pool.keys, *pool.values):
                tensor[:, pool.null_block * size :].zero_()
        if step.num_layers_seen != pool.shape.num_layers:
            raise UnsupportedCache(
                f"{step.num_layers_seen} of {pool.shape.num_layers} layers attended through "
                "the paged attention"
            )

    # -- helpers --------------------------------------------------------------------------
    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.pool.block_size)

    def _tensor(self, values: Sequence[int]) -> torch.Tensor:
        return torch.tensor(list(values), dtype=torch.long, device=self.device)

    @contextlib.contextmanager
    def _paged_attention(self) -> Iterator[None]:
        """The model attends through the pool during our forward only, so that the same model
        object still works elsewhere (a test's `generate`)."""
        config = self.model.config
        before = config._attn_implementation
        config._attn_implementation = NAME
        try:
            yield
        finally:
            config._attn_implementation = before


def _packed_step(
    model: PreTrainedModel,
    pool: KVPool,
    decode: PagedDecode,
    *,
    max_len: int,
    max_rows: int,
    most_tokens: int,
) -> PackedStep | None:
    """Prompt steps through the decode step's compiled regions and the packed kernel; None
    (the model's own forward instead) where the step is compiled or graphed and Triton cannot
    run."""
    kernel = None
    if decode.attention.triton is not None:
        from chatqueue.engine.hf import triton_packed

        kernel = triton_packed
    graphed = bool(decode.graphs.captured)
    if kernel is None and (decode.step.compiled or graphed):
        return None
    return PackedStep(
        model,
        pool,
        decode.step,
        max_len=max_len,
        max_rows=max_rows,
        most_tokens=most_tokens,
        kernel=kernel,
        cuda_graphs=graphed,
    )


def _sampling_request(new: NewSequence) -> SamplingRequest:
    generated = (
        new.prompt_ids[len(new.prompt_ids) - new.num_generated :] if new.num_generated else ()
    )
    return SamplingRequest(new.params, new.prompt_ids, generated=generated)


def _filled_from_tail(decoding: Sequence[_Seq], gone: set[int]) -> list[int]:
    """The decode rows that stay, in their new order: each row left empty by a sequence gone is
    filled by a staying row from the end, the others keep their places.

    NOTE: why not in order. The decode step's inputs hold a block table a row, written again
    only where a row holds another sequence (`PagedInputs.set_rows`); closing the gap would move
    every row after it, so each sequence that ends rewrote the tables of all rows behind it: on
    an H100, a decode step of ~120 rows after one ended took 3.5 ms against 2.2 (benchmarks/
    RESULTS.md, session 24), and in a server sequences end every few steps."""
    staying = len(decoding) - sum(s.rid in gone for s in decoding)
    order = list(range(staying))
    tail = (row for row in range(staying, len(decoding)) if decoding[row].rid not in gone)
    for row in range(staying):
        if decoding[row].rid in gone:
            order[row] = next(tail)
    return order


def _context_window_of(model: PreTrainedModel) -> int:
    config = model.config.get_text_config(decoder=True)
    window = getattr(config, "max_position_embeddings", None)
    assert isinstance(window, int), "the model config names no max_position_embeddings"
    return window

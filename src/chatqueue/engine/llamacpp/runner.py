"""A ModelRunner over llama.cpp: every running sequence decodes one token, and prompts prefill a
chunk, all in one `llama_decode` per step; chatqueue's own sampler picks the tokens.

NOTE: a step frees `released` sequences (their slots keep their cache for prefix reuse, slots.py),
gives each new sequence a slot (and a copy of another slot's cache where that holds much more of
its prompt: `MIN_SHARED`), then fills one batch: a token for every decoding sequence (its last
sampled token, at its next position, logits wanted), then prompt tokens up to `prefill_chunk`
(fewer while sequences decode, where the step would outlast `prefill_stall_limit` decode steps:
`engine/prefill_budget.py`), oldest prompt first; a prompt's last token wants logits. llama.cpp
splits the batch into its own micro-batches. The logits come back as one [rows, vocab] tensor:
decoding rows first, in the sampler's row order, then the prompts that finished, which join the
sampler's rows. A prompt longer than the chunk runs over several steps and is in no step's output
until its last chunk; one waiting for another's shared start to copy is in none until then."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from chatqueue.engine.hf.sampling import Sampled, SamplingBatch, SamplingRequest, step_output
from chatqueue.engine.llamacpp.context import LlamaContext
from chatqueue.engine.llamacpp.slots import Claim, PrefixStats, SlotTable, common_prefix
from chatqueue.engine.prefill_budget import PrefillBudget
from chatqueue.engine.runner import NewSequence, StepBatch, StepOutput, row_masks

_CPU = torch.device("cpu")


# NOTE: a prompt sharing at least this many more tokens with another slot's cache (or with an
# older prompt still prefilling) than with its own slot's takes a copy of that cache: each slot is
# its own KV stream, so llama.cpp copies the whole stream (context_window cells; ~94 MB for the
# default model's 4,096 in f16, some 10-30 ms on a CPU), where a prompt token costs 1-6 ms there.
MIN_SHARED = 64


@dataclass(eq=False, slots=True)
class _Sequence:
    new: NewSequence
    slot: int
    length: int  # tokens in its KV cache
    pending: int | None = None  # its last sampled token, not yet in the cache; None: prefilling
    # an older prompt still prefilling whose first `shared` tokens this one's starts with: it
    # waits for them, then takes a copy
    source: _Sequence | None = None
    shared: int = 0

    @property
    def rid(self) -> int:
        return self.new.rid

    @property
    def prompt_left(self) -> int:
        return len(self.new.prompt_ids) - self.length


class LlamaCppRunner:
    def __init__(
        self,
        context: LlamaContext,
        *,
        slots: int,
        prefill_chunk: int,
        prefill_stall_limit: float | None = None,
        prefix_reuse: bool = True,
    ) -> None:
        assert context.batch.capacity >= slots + prefill_chunk, "a step's batch must fit"
        self._ctx = context
        self._table = SlotTable(slots)
        self._reuse = prefix_reuse
        self._chunk = prefill_chunk
        self._budget = PrefillBudget(prefill_chunk, prefill_stall_limit)
        self._held: dict[int, _Sequence] = {}
        self._decoding: list[_Sequence] = []  # in the sampler's row order
        self._prefilling: list[_Sequence] = []  # oldest first
        self._sampling: SamplingBatch | None = None

    @property
    def context_window(self) -> int:
        return self._ctx.context_window

    @property
    def prefix_stats(self) -> PrefixStats:
        return self._table.stats

    @property
    def info(self) -> dict[str, object]:
        return {
            "runner": "llamacpp",
            "slots": len(self._table),
            "context_window": self.context_window,
            "kv_cache": self._ctx.kv_cache,
            "prefill_chunk": self._chunk,
            "prefill_stall_limit": self._budget.stall_limit,
            "prefix_reuse": "a slot keeps its cache; a prompt takes the one sharing its longest "
            "prefix, or a copy of another slot's holding more",
        }

    def step(self, batch: StepBatch) -> StepOutput:
        self._release(batch.released)
        assert set(self._held) == set(batch.running), (
            f"running {sorted(batch.running)} != sequences held {sorted(self._held)}"
        )
        cached = {}  # rid -> prompt tokens its slot's cache held
        for new in batch.new:
            if reused := self._admit(new):
                cached[new.rid] = reused
        cached.update(self._take_shared())
        decoding = list(self._decoding)
        finishing = self._fill(decoding)
        began = time.perf_counter()
        try:
            logits = self._ctx.decode()
        except Exception:
            self._forget(decoding + self._prefilling)
            raise
        output = self._sample(batch, decoding, finishing, logits)
        prompt_tokens = self._ctx.batch.size - len(decoding)
        self._budget.observe(
            time.perf_counter() - began, decode_rows=len(decoding), prompt_tokens=prompt_tokens
        )
        return replace(output, cached=cached, prefill=self._budget.describe())

    def close(self) -> None:
        self._ctx.close()

    # -- the phases of a step -------------------------------------------------------------
    def _release(self, released: Sequence[int]) -> None:
        gone = [self._held.pop(rid) for rid in released if rid in self._held]
        if not gone:
            return
        for seq in gone:
            self._table.release(seq.slot)
        left = {seq.rid for seq in gone}
        keep = [row for row, seq in enumerate(self._decoding) if seq.rid not in left]
        if len(keep) != len(self._decoding):
            self._decoding = [self._decoding[row] for row in keep]
            assert self._sampling is not None
            self._sampling = self._sampling.select(keep) if keep else None
        self._prefilling = [seq for seq in self._prefilling if seq.rid not in left]

    def _admit(self, new: NewSequence) -> int:
        """A slot for `new`; returns how many of its prompt's tokens that slot's cache holds."""
        assert new.prompt_ids, "a prompt must hold at least one token"
        assert new.rid not in self._held, f"sequence {new.rid} is already running"
        claim = self._table.claim(new.rid, new.prompt_ids, reuse=self._reuse)
        if not self._ctx.keep_prefix(claim.slot, claim.reused):
            self._ctx.clear(claim.slot)
            claim = self._table.forget(claim)
        seq = _Sequence(new, claim.slot, length=claim.reused)
        if self._reuse:
            self._share(seq)
        self._held[new.rid] = seq
        self._prefilling.append(seq)
        return 0 if seq.source is not None else seq.length  # told once, with its copy

    def _share(self, seq: _Sequence) -> None:
        """Where another slot's cache, or an older prompt still prefilling, holds more of `seq`'s
        prompt than its own slot did (two users' system prompt, arriving together or not): a copy
        of that cache now, or once that prompt is in."""
        prompt = seq.new.prompt_ids
        slot, cached = self._table.best_elsewhere(seq.slot, prompt)
        ahead, shared = None, 0
        for other in self._prefilling:
            if other.source is not None:  # itself waiting for a copy: its source is a candidate
                continue
            if (n := common_prefix(other.new.prompt_ids, prompt, len(prompt) - 1)) > shared:
                ahead, shared = other, n
        if max(cached, shared) < seq.length + MIN_SHARED:
            return
        if cached >= shared:
            self._copy(slot, seq, cached)
        else:
            seq.source, seq.shared = ahead, shared

    def _take_shared(self) -> dict[int, int]:
        """The waiting prompts whose source's cache now holds what they share take their copy;
        returns rid -> the tokens it holds. One whose source left computes its own."""
        taken = {}
        for seq in self._prefilling:
            source = seq.source
            if source is None:
                continue
            if self._held.get(source.rid) is not source:  # it left first
                seq.source = None
                if seq.length:
                    taken[seq.rid] = seq.length
            elif source.length >= seq.shared:
                seq.source = None
                self._copy(source.slot, seq, seq.shared)
                taken[seq.rid] = seq.length
        return taken

    def _copy(self, source: int, seq: _Sequence, length: int) -> None:
        if self._ctx.copy_prefix(source, seq.slot, length):
            self._table.copy(source, seq.slot, length)
            seq.length = length
        else:  # it could not be cut there: the whole prompt, from nothing
            self._ctx.clear(seq.slot)
            self._table.forget(Claim(seq.slot, seq.length))
            seq.length = 0

    def _fill(self, decoding: list[_Sequence]) -> list[_Sequence]:
        """Put the step's tokens in the batch; returns the sequences whose prompt it finishes."""
        batch = self._ctx.batch
        batch.clear()
        if decoding:
            batch.add_one_each(
                [seq.pending for seq in decoding],  # type: ignore[misc]
                seq_ids=[seq.slot for seq in decoding],
                positions=[seq.length for seq in decoding],
            )
            for seq in decoding:
                self._table.tokens(seq.slot).append(seq.pending)  # type: ignore[arg-type]
                seq.length += 1
        budget = self._budget.tokens(decoding=len(decoding), waiting=len(self._prefilling))
        finishing: list[_Sequence] = []
        for seq in self._prefilling:
            if budget == 0:
                break
            if seq.source is not None:  # waits for an older prompt's cache to copy
                continue
            take = min(budget, seq.prompt_left)
            chunk = seq.new.prompt_ids[seq.length : seq.length + take]
            finishes = take == seq.prompt_left
            batch.add(chunk, seq_id=seq.slot, start=seq.length, logits_last=finishes)
            self._table.tokens(seq.slot).extend(chunk)
            seq.length += take
            budget -= take
            if finishes:
                finishing.append(seq)
        self._prefilling = [seq for seq in self._prefilling if seq.prompt_left > 0]
        return finishing

    def _sample(
        self,
        batch: StepBatch,
        decoding: list[_Sequence],
        finishing: list[_Sequence],
        logits: torch.Tensor,
    ) -> StepOutput:
        parts: list[tuple[list[int], Sampled]] = []
        if decoding:
            assert self._sampling is not None
            rids = [s.rid for s in decoding]
            masks = row_masks(batch, rids)
            parts.append((rids, self._sampling.sample(logits[: len(decoding)], masks=masks)))
        if finishing:
            requests = [_sampling_request(s.new) for s in finishing]
            joining = SamplingBatch.create(requests, vocab_size=logits.shape[-1], device=_CPU)
            rids = [s.rid for s in finishing]
            masks = row_masks(batch, rids)
            parts.append((rids, joining.sample(logits[len(decoding) :], masks=masks)))
            self._sampling = joining if self._sampling is None else self._sampling.concat(joining)
            self._decoding += finishing
        output = step_output(parts)
        for seq in decoding + finishing:
            seq.pending = output.tokens[seq.rid]
        return output

    def _forget(self, sequences: list[_Sequence]) -> None:
        """A failed decode leaves their caches unknown: empty them (their requests fail)."""
        for seq in sequences:
            self._ctx.clear(seq.slot)
            self._table.tokens(seq.slot).clear()


def _sampling_request(new: NewSequence) -> SamplingRequest:
    """A sequence resumed after a preemption ends its prompt with what it generated: the
    penalties count that as output."""
    generated = (
        new.prompt_ids[len(new.prompt_ids) - new.num_generated :] if new.num_generated else ()
    )
    return SamplingRequest(new.params, new.prompt_ids, generated=generated)

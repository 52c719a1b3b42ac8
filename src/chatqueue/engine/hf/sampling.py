"""Per-request sampling for a whole batch at once: one row per sequence, one tensor per setting.

Order of the logit processors follows transformers' `generate`: penalties, temperature, top-k, top-p.
Logprobs, for the rows that ask, come from the processed logits (after penalties, temperature,
top-k and top-p): the distribution the token was drawn from. A greedy row counts as temperature 1,
so it reports the model's own logprobs (after penalties). One log_softmax and one topk over the
rows that asked; a batch where none asked pays nothing.

Randomness uses the exponential race (argmax of p / E with E ~ Exp(1)), which draws a categorical
sample from one independent noise vector per row, so a seeded row can own its own generator: its draws
never depend on which other rows share the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from chatqueue.engine.runner import SampledLogprobs, StepOutput
from chatqueue.types import SamplingParams

# OpenAI's logprob for a token of no probability (JSON has no -inf): what top-k or top-p removed.
MIN_LOGPROB = -9999.0


@dataclass(frozen=True, slots=True)
class RowLogprobs:
    """Logprobs of some rows of a sampled batch, still on the device."""

    rows: list[int]  # the batch rows that asked, in order
    num_top: list[int]  # how many alternatives each asked for
    chosen: torch.Tensor  # [R] the sampled token's logprob
    top_values: torch.Tensor  # [R, K] K = the most any row asked for
    top_ids: torch.Tensor  # [R, K]

    def per_row(self) -> dict[int, SampledLogprobs]:
        """batch row -> its logprobs, on the host (one transfer per tensor)."""
        chosen = self.chosen.tolist()
        values, ids = self.top_values.tolist(), self.top_ids.tolist()
        return {
            row: SampledLogprobs(chosen[i], tuple(ids[i][:k]), tuple(values[i][:k]))
            for i, (row, k) in enumerate(zip(self.rows, self.num_top, strict=True))
        }


@dataclass(frozen=True, slots=True)
class Sampled:
    """One token per row, and the logprobs of the rows that asked (None: no row did)."""

    tokens: torch.Tensor  # [B] long, on device
    logprobs: RowLogprobs | None = None


def step_output(parts: Sequence[tuple[Sequence[int], Sampled]]) -> StepOutput:
    """The step's output from each part's rids and samples: the token ids cross to the host in
    one `.tolist()`; logprobs only for parts where some row asked."""
    rids = [rid for part_rids, _ in parts for rid in part_rids]
    if not rids:
        return StepOutput({})
    tokens = torch.cat([sampled.tokens for _, sampled in parts]).tolist()
    logprobs: dict[int, SampledLogprobs] = {}
    for part_rids, sampled in parts:
        if sampled.logprobs is not None:
            for row, lp in sampled.logprobs.per_row().items():
                logprobs[part_rids[row]] = lp
    return StepOutput(dict(zip(rids, tokens, strict=True)), logprobs)


@dataclass(frozen=True, slots=True)
class SamplingRequest:
    """What the sampler needs to know about one sequence when it joins the batch."""

    params: SamplingParams
    prompt_ids: Sequence[int]
    # the tail of `prompt_ids` it generated itself (resumed after a preemption): counted as
    # output by the frequency and presence penalties
    generated: Sequence[int] = ()


@dataclass(slots=True)
class SamplingBatch:
    """Sampling state, one row per sequence, in the same row order as the runner's KV batch.

    `seen` marks prompt and generated ids (transformers' repetition penalty looks at both);
    `counts` counts generated ids only (OpenAI's frequency and presence penalties). Both exist only
    while some row has a penalty: a batch of plain requests keeps no [B, V] tables per step."""

    params: list[SamplingParams]
    generators: list[torch.Generator | None]
    temperature: torch.Tensor  # [B] float, 1 where the row is greedy
    top_k: torch.Tensor  # [B] long, vocab size where off
    top_p: torch.Tensor  # [B] float
    repetition_penalty: torch.Tensor  # [B] float
    frequency_penalty: torch.Tensor  # [B] float
    presence_penalty: torch.Tensor  # [B] float
    is_greedy: torch.Tensor  # [B] bool
    seen: torch.Tensor | None  # [B, V] bool, None while no row has a penalty
    counts: torch.Tensor | None  # [B, V] float, likewise
    all_greedy: bool = False
    any_penalty: bool = False
    any_filter: bool = False  # some sampled row has top-k or top-p
    logprob_rows: list[int] = field(default_factory=list)  # rows that asked for logprobs

    def __post_init__(self) -> None:
        self.logprob_rows = [row for row, p in enumerate(self.params) if p.logprobs is not None]
        self.all_greedy = all(p.is_greedy for p in self.params)
        self.any_penalty = any(_has_penalty(p) for p in self.params)
        self.any_filter = any(p.top_k > 0 or p.top_p < 1.0 for p in self.params if not p.is_greedy)
        assert (self.seen is not None) == self.any_penalty == (self.counts is not None)

    @classmethod
    def create(
        cls, requests: Sequence[SamplingRequest], *, vocab_size: int, device: torch.device
    ) -> SamplingBatch:
        params = [r.params for r in requests]

        def column(values: list[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        seen, counts = None, None
        if any(_has_penalty(p) for p in params):
            seen = torch.zeros(len(requests), vocab_size, dtype=torch.bool, device=device)
            counts = torch.zeros(len(requests), vocab_size, device=device)
            for row, request in enumerate(requests):
                ids = torch.tensor(list(request.prompt_ids), dtype=torch.long, device=device)
                seen[row, ids.clamp(0, vocab_size - 1)] = True
                if request.generated:
                    out = torch.tensor(list(request.generated), dtype=torch.long, device=device)
                    counts[row].index_add_(0, out, torch.ones_like(out, dtype=counts.dtype))
        return cls(
            params=params,
            generators=[_make_generator(p.seed, device) for p in params],
            temperature=column([1.0 if p.is_greedy else p.temperature for p in params]),
            top_k=column([p.top_k if p.top_k > 0 else vocab_size for p in params], torch.long),
            top_p=column([p.top_p for p in params]),
            repetition_penalty=column([p.repetition_penalty for p in params]),
            frequency_penalty=column([p.frequency_penalty for p in params]),
            presence_penalty=column([p.presence_penalty for p in params]),
            is_greedy=column([float(p.is_greedy) for p in params], torch.bool),
            seen=seen,
            counts=counts,
        )

    def __len__(self) -> int:
        return len(self.params)

    def select(self, rows: Sequence[int]) -> SamplingBatch:
        """Keep only `rows`, in that order (sequences leaving the batch)."""
        params = [self.params[r] for r in rows]
        index = torch.tensor(list(rows), dtype=torch.long, device=self.temperature.device)
        tensors = {name: getattr(self, name).index_select(0, index) for name in _ROW_TENSORS}
        if any(_has_penalty(p) for p in params):
            assert self.seen is not None and self.counts is not None
            tensors |= {"seen": self.seen[index], "counts": self.counts[index]}
        return _assemble(params, [self.generators[r] for r in rows], tensors)

    def concat(self, other: SamplingBatch) -> SamplingBatch:
        """These rows followed by `other`'s (sequences joining the batch)."""
        tensors = {
            name: torch.cat([getattr(self, name), getattr(other, name)]) for name in _ROW_TENSORS
        }
        if self.any_penalty or other.any_penalty:
            # A side without tables has no row with a penalty: zeros are never read for it.
            for name, dtype in (("seen", torch.bool), ("counts", torch.float32)):
                parts = [getattr(self, name), getattr(other, name)]
                like = next(p for p in parts if p is not None)
                tensors[name] = torch.cat(
                    [
                        p if p is not None else like.new_zeros(len(b), like.shape[1], dtype=dtype)
                        for p, b in zip(parts, (self, other), strict=True)
                    ]
                )
        return _assemble(self.params + other.params, self.generators + other.generators, tensors)

    def sample(
        self, logits: torch.Tensor, *, masks: Sequence[bytes | None] | None = None
    ) -> Sampled:
        """Pick one token per row from `logits` [B, V] and record it; logprobs for the rows that
        asked. `masks` (one per row, None where a row has none; `row_masks`): a masked row
        samples only among its allowed tokens (`logits` is changed in place)."""
        if masks is not None:
            apply_masks(logits, masks)
        if self.all_greedy and not self.any_penalty:
            tokens = argmax_rows(logits)  # the common case: no softmax, no sort, no tables
            return Sampled(tokens, self._logprobs(logits, tokens))
        logits = self.process(logits)
        tokens = argmax_rows(logits)
        if not self.all_greedy:
            tokens = torch.where(self.is_greedy, tokens, self._draw(logits))
        self._record(tokens)
        return Sampled(tokens, self._logprobs(logits, tokens))

    def _logprobs(self, processed: torch.Tensor, tokens: torch.Tensor) -> RowLogprobs | None:
        if not self.logprob_rows:
            return None
        rows = self.logprob_rows
        num_top = [self.params[row].logprobs or 0 for row in rows]
        if len(rows) == len(self):
            picked, picked_tokens = processed, tokens
        else:
            index = torch.tensor(rows, dtype=torch.long, device=processed.device)
            picked, picked_tokens = processed.index_select(0, index), tokens.index_select(0, index)
        logprobs = torch.log_softmax(picked.float(), dim=-1).clamp_min(MIN_LOGPROB)
        chosen = logprobs.gather(1, picked_tokens.unsqueeze(1)).squeeze(1)
        top_values, top_ids = logprobs.topk(max(num_top), dim=-1)
        return RowLogprobs(rows, num_top, chosen, top_values, top_ids)

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits after penalties, temperature, top-k and top-p; filtered entries are -inf."""
        logits = logits.float()
        if self.any_penalty:
            logits = self._apply_penalties(logits)
        if self.all_greedy:
            return logits
        logits = logits / self.temperature.unsqueeze(1)
        if self.any_filter:
            logits = _filter_top_k_top_p(logits, self.top_k, self.top_p)
        return logits

    def _apply_penalties(self, logits: torch.Tensor) -> torch.Tensor:
        assert self.seen is not None and self.counts is not None
        penalty = self.repetition_penalty.unsqueeze(1)
        penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
        logits = torch.where(self.seen, penalized, logits)
        logits = logits - self.frequency_penalty.unsqueeze(1) * self.counts
        return logits - self.presence_penalty.unsqueeze(1) * (self.counts > 0).float()

    def _draw(self, logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits, dim=-1)
        # NOTE: unseeded rows share one draw from torch's default generator; each seeded row then
        # overwrites its noise from its own generator, so its stream advances only with its own steps.
        noise = torch.empty_like(probs).exponential_()
        for row, generator in enumerate(self.generators):
            if generator is not None:
                noise[row].exponential_(generator=generator)
        return argmax_rows(probs / noise.clamp_min(torch.finfo(noise.dtype).tiny))

    def _record(self, tokens: torch.Tensor) -> None:
        if self.seen is None or self.counts is None:
            return
        rows = tokens.unsqueeze(1)
        self.seen.scatter_(1, rows, True)
        self.counts.scatter_add_(1, rows, torch.ones_like(rows, dtype=self.counts.dtype))


_ROW_TENSORS = (
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "frequency_penalty",
    "presence_penalty",
    "is_greedy",
)


def _assemble(
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    tensors: dict[str, torch.Tensor],
) -> SamplingBatch:
    return SamplingBatch(
        params=params,
        generators=generators,
        temperature=tensors["temperature"],
        top_k=tensors["top_k"],
        top_p=tensors["top_p"],
        repetition_penalty=tensors["repetition_penalty"],
        frequency_penalty=tensors["frequency_penalty"],
        presence_penalty=tensors["presence_penalty"],
        is_greedy=tensors["is_greedy"],
        seen=tensors.get("seen"),
        counts=tensors.get("counts"),
    )


def apply_masks(logits: torch.Tensor, masks: Sequence[bytes | None]) -> None:
    """Set to -inf, in place, every logit of a masked row whose token its mask does not allow
    (StepBatch.masks' layout: bit i of little-endian 32-bit word i // 32; ids past the mask are
    not allowed). One unpack for the masked rows together; the other rows are not touched."""
    rows = [row for row, mask in enumerate(masks) if mask is not None]
    if not rows:
        return
    packed = bytearray().join(masks[row] or b"" for row in rows)
    words = torch.frombuffer(packed, dtype=torch.int32).view(len(rows), -1).to(logits.device)
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    forbidden = ((words.unsqueeze(-1) >> shifts) & 1).view(len(rows), -1) == 0
    vocab = logits.shape[-1]
    width = min(vocab, forbidden.shape[1])
    for i, row in enumerate(rows):
        logits[row, :width].masked_fill_(forbidden[i, :width], float("-inf"))
        if width < vocab:
            logits[row, width:] = float("-inf")


def _has_penalty(params: SamplingParams) -> bool:
    return (
        params.repetition_penalty != 1.0
        or params.frequency_penalty != 0.0
        or params.presence_penalty != 0.0
    )


def _make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def _filter_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Mask to -inf every token outside each row's top-k, then outside its top-p nucleus (computed on
    what top-k kept). The most likely token always survives."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device).unsqueeze(0)
    sorted_logits = sorted_logits.masked_fill(ranks >= top_k.unsqueeze(1), float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    # NOTE: rows with top_p 1 are exempt: rounding can push the running mass past 1.0.
    outside_nucleus = (mass_before >= top_p.unsqueeze(1)) & (ranks > 0) & (top_p < 1.0).unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(outside_nucleus, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)


def argmax_rows(values: torch.Tensor) -> torch.Tensor:
    """The index of each row's largest value (the first, where several tie), as torch's
    `argmax(dim=-1)` gives it. NOTE: a float32 CPU tensor goes through numpy: on one thread
    torch's reduction over a row of 49,152 logits took 43 us, numpy's 5.7 us (32 rows: 1.3 ms
    against 0.1 ms of a CPU step; benchmarks/RESULTS.md, issue 17)."""
    if values.device.type == "cpu" and values.dtype == torch.float32 and values.dim() == 2:
        return torch.from_numpy(values.detach().numpy().argmax(axis=-1))
    return values.argmax(dim=-1)

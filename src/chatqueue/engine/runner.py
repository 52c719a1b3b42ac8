"""The contract between the engine loop and a model: runners see batches, never single requests.

Two levels. A `ModelRunner` holds the model and advances batches (what the model process runs).
A `Runner` is what the engine drives: a ModelRunner together with the tokenizer the server
detokenizes with and the name it serves under.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from chatqueue.text.tokenizer import Tokenizer
from chatqueue.types import SamplingParams


@dataclass(frozen=True, slots=True)
class KVSpec:
    """A runner's KV pool, which the scheduler admits by (`scheduler/blocks.py`): `num_blocks`
    blocks of `block_size` tokens. `cache_key` names whatever else changes the KV (the model,
    its dtype), so blocks are shared only between equal KV. With `prefix_caching`, the runner
    reuses the blocks a new sequence's table starts with (`NewSequence.num_cached_tokens`)."""

    num_blocks: int
    block_size: int
    cache_key: str
    prefix_caching: bool = True

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)


@dataclass(frozen=True, slots=True)
class NewSequence:
    """A request admitted this step: the runner prefills it and samples its first token.

    A request resumed after preemption comes back as new: `prompt_ids` then ends with the
    `num_generated` tokens it had generated (they count as output for the sampling penalties).
    With a KV pool, `block_table` names its blocks and the KV of its first `num_cached_tokens`
    tokens is in them already: only the rest is prefilled."""

    rid: int
    prompt_ids: Sequence[int]
    params: SamplingParams
    num_generated: int = 0
    block_table: Sequence[int] = ()
    num_cached_tokens: int = 0


@dataclass(frozen=True, slots=True)
class StepBatch:
    """One step of work. `released` are freed first (finished or aborted since the last step), then
    `new` are prefilled and `running` decode one token each, together where the runner can. Every
    sequence is named by its request's id (`rid`).

    `masks` (structured output): rid -> the tokens that sequence may sample this step, one bit
    per token id (bit i of little-endian 32-bit word i // 32; ids past the mask are not allowed).
    A runner must sample a masked row's token from its allowed tokens only: set every other
    logit to -inf before sampling, after the model's logits and before penalties, temperature
    and top-k/top-p (`SamplingBatch.sample(logits, masks=row_masks(batch, rids))` does it for
    the batched sampler; rows without a mask pay nothing). A row still prefilling in chunks
    ignores its mask; it gets a fresh one each step."""

    new: Sequence[NewSequence]
    running: Sequence[int]
    released: Sequence[int]
    grown: Mapping[int, Sequence[int]] = field(default_factory=dict)  # rid -> blocks appended
    masks: Mapping[int, bytes] = field(default_factory=dict)

    def __reduce__(self) -> tuple[type[StepBatch], tuple[Any, ...]]:
        # NOTE: a step crosses to the model process as a pickle; a slots dataclass's own
        # state walks `dataclasses.fields` each way (twice the time of this, a step, per side)
        return StepBatch, (self.new, self.running, self.released, self.grown, self.masks)

    @property
    def is_empty(self) -> bool:
        return not self.new and not self.running


def row_masks(batch: StepBatch, rids: Sequence[int]) -> list[bytes | None] | None:
    """The masks of `rids` (a runner's rows, in its order), or None if none of them has one."""
    if not batch.masks:
        return None
    masks = [batch.masks.get(rid) for rid in rids]
    return masks if any(m is not None for m in masks) else None


def allowed(mask: bytes, token_id: int) -> bool:
    """Whether `mask` (StepBatch.masks' layout) allows `token_id`."""
    byte = token_id >> 3
    return byte < len(mask) and bool(mask[byte] >> (token_id & 7) & 1)


def allowed_ids(mask: bytes) -> list[int]:
    """Every token id `mask` allows, in order (for runners without tensors, as the mock)."""
    return [
        byte * 8 + bit
        for byte, value in enumerate(mask)
        if value
        for bit in range(8)
        if value >> bit & 1
    ]


@dataclass(frozen=True, slots=True)
class SampledLogprobs:
    """For a row that asked (`SamplingParams.logprobs`): the sampled token's logprob and the most
    likely tokens' ids and logprobs, most likely first, from the distribution it was sampled from."""

    logprob: float
    top_ids: tuple[int, ...] = ()
    top_logprobs: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True)
class StepOutput:
    """What a step produced: rid -> the token sampled for it, and the logprobs of the rows that
    asked for them. A sequence still prefilling in chunks is in neither."""

    tokens: dict[int, int]
    logprobs: dict[int, SampledLogprobs] = field(default_factory=dict)
    # seconds the model spent on the step in its own process (None in the engine's): the rest of
    # the step's round trip is the hand-over between the processes (engine.overlap)
    busy_s: float | None = None
    # rid -> leading prompt tokens a sequence that joined this step found in the runner's own
    # cache, where the runner finds its prefix reuse itself (llama.cpp's slots); a KV pool's
    # reuse is the scheduler's, known at admission (`NewSequence.num_cached_tokens`)
    cached: dict[int, int] = field(default_factory=dict)
    # what the runner's prefill budget has learned (`PrefillBudget.describe`), from a runner
    # that has one: the engine keeps the latest for /load
    prefill: dict[str, float | int | None] | None = None

    def __reduce__(self) -> tuple[type[StepOutput], tuple[Any, ...]]:
        # as StepBatch's
        return StepOutput, (self.tokens, self.logprobs, self.busy_s, self.cached, self.prefill)


class RunnerLost(Exception):
    """Raised by `step` when the runner can take no further step (its process died). The engine
    fails every request it holds, reports itself failed and stops."""


@runtime_checkable
class ModelRunner(Protocol):
    """A model that advances batches. Every method runs on the engine thread (or in the model
    process, behind a ProcessRunner)."""

    @property
    def context_window(self) -> int:
        """Most tokens (prompt + completion) one sequence may hold."""
        ...

    def step(self, batch: StepBatch) -> StepOutput:
        """Advance the batch one token. Returns rid -> the token sampled for it (and logprobs
        where asked). A sequence still prefilling in chunks may be missing; every other sequence
        in the batch must be present."""
        ...

    def close(self) -> None:
        """Free the model's memory. Called once, when the worker stops."""
        ...


@runtime_checkable
class Runner(ModelRunner, Protocol):
    """What the engine drives. `tokenizer` is used off the engine thread too (tokenizing)."""

    @property
    def model_name(self) -> str: ...

    @property
    def tokenizer(self) -> Tokenizer: ...


def runner_info(runner: object) -> dict[str, Any]:
    """What a model runner says it chose (runner, attention kernel, cache layout and size, dtype,
    CUDA graphs), as its optional `info` property gives it; {} from a runner that says nothing."""
    info = getattr(runner, "info", None)
    return dict(info) if isinstance(info, dict) else {}


@dataclass(frozen=True, slots=True)
class TokenizedRunner:
    """A ModelRunner in this process, with the tokenizer and name the server loaded for it."""

    model: ModelRunner
    tokenizer: Tokenizer
    model_name: str

    @property
    def context_window(self) -> int:
        return self.model.context_window

    @property
    def info(self) -> dict[str, Any]:
        return runner_info(self.model)

    def step(self, batch: StepBatch) -> StepOutput:
        return self.model.step(batch)

    def close(self) -> None:
        self.model.close()

    @property
    def kv_spec(self) -> KVSpec | None:
        return self.model.kv_spec if isinstance(self.model, PagedKV) else None


@runtime_checkable
class PagedKV(Protocol):
    """A runner that keeps KV in a pool of blocks the scheduler allocates (None: it has none)."""

    @property
    def kv_spec(self) -> KVSpec | None: ...


@runtime_checkable
class Pipelined(Protocol):
    """A runner that takes a step before the one it runs has been read back (its model runs
    apart, in its own process): the engine sends step k+1, then reads step k's output, so
    that the model runs k+1 while the server handles k's tokens and schedules k+2. Outputs
    come back in the order the steps were sent; `step` is `send_step` then `recv_step`."""

    def send_step(self, batch: StepBatch) -> None: ...

    def recv_step(self) -> StepOutput:
        """The output of the oldest step sent and not read yet (raises as `step` would)."""
        ...


@runtime_checkable
class Restartable(Protocol):
    """A runner whose model lives apart (its own process) and can be started again when it dies
    or hangs. `kill` may be called from any thread; the others run on the engine thread."""

    def check_alive(self) -> None:
        """Raise RunnerLost if the model is gone (checked while the engine is idle)."""
        ...

    def kill(self) -> None:
        """End the model at once (it hangs); the step in flight then raises RunnerLost."""
        ...

    def restart(self) -> None:
        """Start the model anew (blocking); raises if it cannot be loaded."""
        ...

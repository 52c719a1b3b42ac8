"""Chats on made-up step costs driving a prefill budget (`engine/prefill_budget.py`) in closed
loop, on the clock of their own steps: no model, no runner, seconds on any CPU. Used by its unit
tests and by `benchmarks/sim_prefill_budget.py`.

Each chat: a first turn of 320-500 prompt tokens, then turns of 20-200 more, replies of 100-300
tokens, 0.5-1.5 s of thought between; prompts are served oldest first, as the runners do."""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Protocol


class Budget(Protocol):
    def tokens(self, *, decoding: int, waiting: int) -> int: ...

    def observe(self, seconds: float, *, decode_rows: int, prompt_tokens: int) -> None: ...


@dataclass(frozen=True, slots=True)
class StepCosts:
    """A step: a decode step of `decode_s` + `row_s` a row, plus, where it has prompt tokens,
    `fixed_s` + `token_s` a token; `noise` (lognormal) on every step, and one in a hundred 2-20
    ms slower. `packed`: a step with prompt tokens runs its decode rows with them instead (the
    pool's packed step on a GPU), `fixed_s` + `token_s` a token of both. The defaults: an H100's
    costs under the pool's runner, roughly."""

    decode_s: float = 0.0012
    row_s: float = 0.000008
    fixed_s: float = 0.002
    token_s: float = 0.000005
    noise: float = 0.1
    packed: bool = False
    packed_row_s: float | None = None  # packed: a decode row's cost in it (None: `token_s`)
    knee_rows: int = 0  # a decode step costs `row_s` a row past this many rows only (a GPU's)

    def step(self, rows: int, prompt_tokens: int) -> float:
        if self.packed and prompt_tokens:
            row_s = self.token_s if self.packed_row_s is None else self.packed_row_s
            return self.fixed_s + row_s * rows + self.token_s * prompt_tokens
        decode = self.decode_s + self.row_s * max(rows - self.knee_rows, 0) if rows else 0.0
        return decode + (self.fixed_s + self.token_s * prompt_tokens if prompt_tokens else 0.0)

    def noisy_step(self, rows: int, prompt_tokens: int, rng: random.Random) -> float:
        """A step's time as a machine gives it: `noise`, and one step in a hundred 2-20 ms slower."""
        step = self.step(rows, prompt_tokens) * rng.lognormvariate(0, self.noise)
        if rng.random() < 0.01:
            step += rng.uniform(0.002, 0.02)
        return step


# what an H100 measured under the pool's runner (Llama-3.2-1B's shape, bf16): a decode step
# 1.44 ms at 1 row, 1.73 at 64, ~3 at 256; a packed step of 514 tokens ~4.2 ms, of ~250 ~3.3
H100_PACKED = StepCosts(
    decode_s=0.0014, row_s=0.000006, fixed_s=0.0024, token_s=0.0000035, packed=True
)

# the same H100 as session 25's burst trace gave it (`bench_paged_gpu.py --parts throughput`, 256
# requests at limit 2 and with none: benchmarks/RESULTS.md): a decode step 2.09 ms + 4.8 us a
# row; a packed step 2.9 ms + 8.5 us a decode row + 1.9 us a prompt token
H100_TRACED = StepCosts(
    decode_s=0.00209,
    row_s=0.0000048,
    fixed_s=0.0029,
    token_s=0.0000019,
    packed=True,
    packed_row_s=0.0000085,
)

# the same trace's decode steps by their rows: ~1.9 ms flat up to 64 rows (the weights' read),
# then ~7 us a row (2.43 ms at 64-96 rows, 3.26 at 160-192), as a GPU's decode step grows
H100_KNEE = replace(H100_TRACED, decode_s=0.0019, row_s=0.000007, knee_rows=64)


@dataclass(slots=True)
class ChatsRun:
    ttfts: list[float] = field(default_factory=list)  # each turn's (>= 3) time to first token
    grants: list[int] = field(default_factory=list)  # the budget's grants beside decode
    mixed: list[float] = field(default_factory=list)  # steps with decode rows and prompt tokens
    alone: list[float] = field(default_factory=list)  # steps of decode rows alone


def simulate_chats(
    budget: Budget,
    rng: random.Random,
    *,
    costs: StepCosts = StepCosts(),
    chats: int = 64,
    seconds: float = 30.0,
    warmup_s: float = 0.0,
) -> ChatsRun:
    """`chats` chats for `seconds` of their steps' time; `warmup_s`: the first step's time, where
    a server's first step is slow."""
    prompt = {c: (rng.randint(320, 500), 0.0, 1) for c in range(chats)}  # tokens, since, turn
    order = list(range(chats))
    decoding: dict[int, tuple[int, int]] = {}  # tokens left, turn
    thinking: dict[int, tuple[float, int]] = {}  # until when, turn
    run, now, first = ChatsRun(), 0.0, True
    while now < seconds:
        for chat, (until, turn) in list(thinking.items()):
            if until <= now:
                del thinking[chat]
                prompt[chat] = (rng.randint(20, 200), now, turn + 1)
                order.remove(chat)
                order.append(chat)
        if not decoding and not prompt:
            now = min(until for until, _ in thinking.values())
            continue
        rows, n, done = len(decoding), 0, []
        if prompt:
            left = budget.tokens(decoding=rows, waiting=len(prompt))
            if rows:
                run.grants.append(left)
            for chat in [c for c in order if c in prompt]:
                tokens, since, turn = prompt[chat]
                took = min(tokens, left)
                left, n = left - took, n + took
                if took < tokens:
                    prompt[chat] = (tokens - took, since, turn)
                    break
                done.append(chat)
        step = costs.noisy_step(rows, n, rng)
        if first and warmup_s:
            step = warmup_s
        first = False
        budget.observe(step, decode_rows=rows, prompt_tokens=n)
        if rows:
            (run.mixed if n else run.alone).append(step)
        now += step
        for chat, (tokens_left, turn) in list(decoding.items()):
            if tokens_left > 1:
                decoding[chat] = (tokens_left - 1, turn)
            else:
                del decoding[chat]
                thinking[chat] = (now + rng.uniform(0.5, 1.5), turn)
        for chat in done:
            _, since, turn = prompt.pop(chat)
            if turn >= 3:
                run.ttfts.append(now - since)
            decoding[chat] = (rng.randint(100, 300), turn)
    return run


@dataclass(slots=True)
class BurstRun:
    seconds: float = 0.0  # until the last request's last token
    grants: list[int] = field(default_factory=list)  # the budget's grants beside decode
    steps_with_prompts: int = 0


def simulate_burst(
    budget: Budget,
    rng: random.Random,
    *,
    costs: StepCosts = StepCosts(),
    requests: int = 256,
    prompt_tokens: int = 256,
    new_tokens: int = 256,
) -> BurstRun:
    """`requests` arriving together, each `prompt_tokens` long and wanting `new_tokens`, all
    admitted at once (issue 6's burst): prompts oldest first, a request decoding from the step
    after its prompt's last token."""
    waiting = [prompt_tokens] * requests  # prompt tokens left, oldest first
    decoding: list[int] = []  # tokens left to make
    run = BurstRun()
    while waiting or decoding:
        rows, n, started = len(decoding), 0, 0
        if waiting:
            left = budget.tokens(decoding=rows, waiting=len(waiting))
            if rows:
                run.grants.append(left)
            while waiting and left:
                took = min(waiting[0], left)
                waiting[0] -= took
                left, n = left - took, n + took
                if waiting[0] == 0:
                    waiting.pop(0)
                    started += 1
        step = costs.noisy_step(rows, n, rng)
        budget.observe(step, decode_rows=rows, prompt_tokens=n)
        run.seconds += step
        run.steps_with_prompts += n > 0
        # the step's decode rows each made a token; a prompt finished makes its first
        decoding = [left - 1 for left in decoding if left > 1] + [new_tokens - 1] * started
    return run

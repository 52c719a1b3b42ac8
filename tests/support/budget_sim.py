"""Chats on made-up step costs driving a prefill budget (`engine/prefill_budget.py`) in closed
loop, on the clock of their own steps: no model, no runner, seconds on any CPU. Used by its unit
tests and by `benchmarks/sim_prefill_budget.py`.

Each chat: a first turn of 320-500 prompt tokens, then turns of 20-200 more, replies of 100-300
tokens, 0.5-1.5 s of thought between; prompts are served oldest first, as the runners do."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Protocol


class Budget(Protocol):
    def tokens(self, *, decoding: int, waiting: int) -> int: ...

    def observe(self, seconds: float, *, decode_rows: int, prompt_tokens: int) -> None: ...


@dataclass(frozen=True, slots=True)
class StepCosts:
    """A step: a decode step of `decode_s` + `row_s` a row, plus, where it has prompt tokens,
    `fixed_s` + `token_s` a token; `noise` (lognormal) on every step, and one in a hundred 2-20
    ms slower. The defaults: an H100's costs under the pool's runner, roughly."""

    decode_s: float = 0.0012
    row_s: float = 0.000008
    fixed_s: float = 0.002
    token_s: float = 0.000005
    noise: float = 0.1


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
        step = (costs.decode_s + costs.row_s * rows if rows else 0.0) + (
            costs.fixed_s + costs.token_s * n if n else 0.0
        )
        step *= rng.lognormvariate(0, costs.noise)
        if rng.random() < 0.01:
            step += rng.uniform(0.002, 0.02)
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

"""Fit a conversation into the model's context: drop the oldest exchanges, keep the system prompt
and the newest user message."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from chatqueue.history.types import Turn
from chatqueue.types import ChatMessage

Encode = Callable[[Sequence[ChatMessage]], Awaitable[list[int]]]


@dataclass(frozen=True, slots=True)
class FittedPrompt:
    messages: list[ChatMessage]
    dropped_turns: int  # exchanges (a user message and its reply) left out, oldest first
    num_tokens: int


async def fit_history(
    turns: Sequence[Turn], *, system: str | None, encode: Encode, budget: int
) -> FittedPrompt:
    """The longest tail of `turns` (whole exchanges) whose prompt takes at most `budget` tokens.

    `turns` ends with the user message to answer, which is always kept; if even that alone does
    not fit, the result is over budget and admission reports the prompt as too long.
    """
    turns = alternating(turns)
    starts = [i for i, t in enumerate(turns) if t.role == "user"]
    assert starts, "a prompt needs a user message"
    if starts[0] != 0:
        starts.insert(0, 0)
    head = [ChatMessage("system", system)] if system else []

    async def fitted(num_dropped: int) -> FittedPrompt:
        messages = head + [t.message() for t in turns[starts[num_dropped] :]]
        return FittedPrompt(messages, num_dropped, len(await encode(messages)))

    # NOTE: the prompt only shrinks as more is dropped, so a binary search finds the fewest
    # exchanges to drop in log2(n) tokenizations rather than n.
    best = await fitted(0)
    if best.num_tokens <= budget:
        return best
    lo, hi = 1, len(starts) - 1
    best = await fitted(hi)
    if best.num_tokens > budget:
        return best
    while lo < hi:
        mid = (lo + hi) // 2
        candidate = await fitted(mid)
        if candidate.num_tokens <= budget:
            best, hi = candidate, mid
        else:
            lo = mid + 1
    return best


def alternating(turns: Sequence[Turn]) -> list[Turn]:
    """`turns` as a prompt may take them: user and assistant in turn, never two user messages in
    a row.

    NOTE: a user message with no reply after it is one the server died before answering (from
    before replies were stored as they stream), or one whose reply was cut before its first
    word. Left out of the prompt (the stored history keeps it): many chat templates refuse two
    user messages in a row, and the user asked again anyway.
    """
    kept: list[Turn] = []
    for t in turns:
        if t.role == "assistant" and not t.content:
            continue  # cut before its first word: no reply at all
        if t.role == "user" and kept and kept[-1].role == "user":
            kept.pop()
        kept.append(t)
    return kept

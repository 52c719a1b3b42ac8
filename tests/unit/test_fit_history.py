"""Fitting a conversation into the context: whole exchanges dropped oldest first, the system
prompt and the newest message kept."""

from __future__ import annotations

from collections.abc import Sequence

from chatqueue.chat.window import fit_history
from chatqueue.engine.mock import MockTokenizer
from chatqueue.history.types import Turn
from chatqueue.types import ChatMessage

tokenizer = MockTokenizer()


async def encode(messages: Sequence[ChatMessage]) -> list[int]:
    return tokenizer.apply_chat_template(messages)


def exchanges(n: int, words: int) -> list[Turn]:
    turns = []
    for i in range(n):
        text = " ".join([f"w{i}"] * words)
        turns += [Turn("user", text), Turn("assistant", text)]
    return turns


async def test_everything_fits_nothing_dropped() -> None:
    turns = [*exchanges(2, 3), Turn("user", "last")]
    fitted = await fit_history(turns, system="sys", encode=encode, budget=1000)
    assert fitted.dropped_turns == 0
    assert fitted.messages[0] == ChatMessage("system", "sys")
    assert [m.content for m in fitted.messages[1:]] == [t.content for t in turns]


async def test_drops_the_fewest_oldest_exchanges_that_make_it_fit() -> None:
    turns = [*exchanges(6, 10), Turn("user", "last")]
    full = len(await encode([ChatMessage("system", "sys"), *(t.message() for t in turns)]))
    per_exchange = 2 * (10 + 2)  # each message: its words, a role token and an end token
    budget = full - 2 * per_exchange - 1  # two exchanges are not enough: three must go
    fitted = await fit_history(turns, system="sys", encode=encode, budget=budget)
    assert fitted.dropped_turns == 3
    assert fitted.num_tokens <= budget
    assert fitted.messages[0] == ChatMessage("system", "sys")
    assert fitted.messages[1].content.startswith("w3")
    assert fitted.messages[-1] == ChatMessage("user", "last")


async def test_the_newest_message_is_kept_even_when_it_alone_is_too_long() -> None:
    turns = [*exchanges(3, 5), Turn("user", " ".join(["x"] * 50))]
    fitted = await fit_history(turns, system=None, encode=encode, budget=10)
    assert fitted.dropped_turns == 3
    assert [m.role for m in fitted.messages] == ["user"]
    assert fitted.num_tokens > 10  # admission then answers PromptTooLong


async def test_a_user_message_that_never_got_a_reply_is_left_out_of_the_prompt() -> None:
    # What a server killed mid-reply used to leave: a user turn with no reply after it.
    turns = [
        Turn("user", "asked before the crash"),
        Turn("user", "asked again"),
        Turn("assistant", "an answer"),
        Turn("user", "one more"),
        Turn("assistant", "", interrupted=True, finish_reason="abort"),  # died before any token
        Turn("user", "last"),
    ]
    fitted = await fit_history(turns, system="sys", encode=encode, budget=1000)
    roles = [m.role for m in fitted.messages]
    assert roles == ["system", "user", "assistant", "user"]
    assert [m.content for m in fitted.messages[1:]] == ["asked again", "an answer", "last"]

"""Which KV slot holds which sequence, and what each slot's cache still holds after its sequence
left, so that the next prompt starting the same way skips that prefix (plain Python: no llama.cpp).

NOTE: a sequence that leaves keeps its tokens in its slot's cache. A new sequence takes the free
slot whose cached tokens share the longest prefix with its prompt (ties: the slot free the
longest, so that recent prompts stay cached), and prefills only the rest. At least the prompt's
last token is always run again: its logits give the first reply token."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(slots=True)
class Slot:
    index: int
    tokens: list[int] = field(default_factory=list)  # what its KV cache holds, position by position
    rid: int | None = None  # the sequence holding it; None: free
    freed_at: int = 0  # when it was last freed (a counter), for ties


@dataclass(frozen=True, slots=True)
class Claim:
    """A slot taken for a new sequence: its cache keeps the first `reused` tokens of the prompt."""

    slot: int
    reused: int


@dataclass(slots=True)
class PrefixStats:
    prompts: int = 0
    prompt_tokens: int = 0
    reused_tokens: int = 0  # prompt tokens found in a slot's cache, not run again
    hits: int = 0  # prompts that reused at least one token


class SlotTable:
    def __init__(self, num_slots: int) -> None:
        self._slots = [Slot(i) for i in range(num_slots)]
        self._clock = 0
        self.stats = PrefixStats()

    def __len__(self) -> int:
        return len(self._slots)

    @property
    def num_free(self) -> int:
        return sum(slot.rid is None for slot in self._slots)

    def tokens(self, slot: int) -> list[int]:
        """The slot's cached tokens (the runner appends what it feeds)."""
        return self._slots[slot].tokens

    def claim(self, rid: int, prompt: Sequence[int], *, reuse: bool = True) -> Claim:
        """A free slot for `rid`, the one whose cache shares the longest prefix with `prompt`; its
        cached tokens are cut to that prefix. Without `reuse`, the slot free the longest, its
        cache cut to nothing."""
        free = [slot for slot in self._slots if slot.rid is None]
        assert free, "more sequences than slots"
        # the prompt's last token always runs: its logits give the first reply token
        limit = len(prompt) - 1 if reuse else 0
        best = max(free, key=lambda s: (common_prefix(s.tokens, prompt, limit), -s.freed_at))
        reused = common_prefix(best.tokens, prompt, limit)
        del best.tokens[reused:]
        best.rid = rid
        self.stats.prompts += 1
        self.stats.prompt_tokens += len(prompt)
        self.stats.reused_tokens += reused
        self.stats.hits += reused > 0
        return Claim(best.index, reused)

    def best_elsewhere(self, slot: int, prompt: Sequence[int]) -> tuple[int, int]:
        """(another slot, busy or free, and how many of `prompt`'s tokens its cache holds): the
        one holding the most; (-1, 0) where none holds any."""
        limit = len(prompt) - 1
        best, most = -1, 0
        for other in self._slots:
            if other.index != slot and (n := common_prefix(other.tokens, prompt, limit)) > most:
                best, most = other.index, n
        return best, most

    def copy(self, source: int, slot: int, length: int) -> None:
        """`slot`'s cache now holds `source`'s first `length` tokens (more than it reused)."""
        tokens = self._slots[slot].tokens
        reused = len(tokens)
        tokens[:] = self._slots[source].tokens[:length]
        self.stats.reused_tokens += length - reused
        self.stats.hits += reused == 0

    def forget(self, claim: Claim) -> Claim:
        """The slot's cache could not be cut where `claim` says and was cleared whole."""
        self._slots[claim.slot].tokens.clear()
        self.stats.reused_tokens -= claim.reused
        self.stats.hits -= claim.reused > 0
        return Claim(claim.slot, 0)

    def release(self, slot: int) -> None:
        """Its sequence left; the slot keeps its cached tokens for a later prompt."""
        self._clock += 1
        self._slots[slot].rid = None
        self._slots[slot].freed_at = self._clock


def common_prefix(cached: Sequence[int], prompt: Sequence[int], limit: int) -> int:
    """How many of `prompt`'s first `limit` tokens `cached` starts with."""
    n = min(len(cached), limit)
    for i in range(n):
        if cached[i] != prompt[i]:
            return i
    return n

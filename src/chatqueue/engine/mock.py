"""A model-free runner: deterministic text at a set pace, for instant start-up, tests and benches."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from chatqueue.engine.runner import (
    KVSpec,
    SampledLogprobs,
    StepBatch,
    StepOutput,
    allowed,
    allowed_ids,
)
from chatqueue.types import ChatMessage

MockMode = Literal["echo", "lorem"]

_SPECIALS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
SYSTEM, USER, ASSISTANT, END = range(len(_SPECIALS))
# NOTE: one piece per printable ASCII character, so that a constrained reply can be spelled (the
# grammar library sees these and the lorem words, a fixed vocabulary). A constrained mock row takes
# the first piece its mask allows in this order: END, then the closing quote, brace, bracket and
# the comma, so any JSON grammar ends soon (a string closes at once, an object, an array or a
# number as soon as it may).
_CHARS = (
    '"}],0123456789'
    + "".join(c for c in map(chr, range(0x21, 0x7F)) if c not in '"}],0123456789')
    + "\n "
)
_WORD = re.compile(r"\s*\S+|\s+$")
LOREM = [
    "Lorem",
    "ipsum",
    "dolor",
    "sit",
    "amet,",
    "consectetur",
    "adipiscing",
    "elit,",
    "sed",
    "do",
    "eiusmod",
    "tempor",
    "incididunt",
    "ut",
    "labore",
    "et",
    "dolore",
    "magna",
    "aliqua.",
    "Ut",
    "enim",
    "ad",
    "minim",
    "veniam,",
    "quis",
    "nostrud",
    "exercitation",
    "ullamco",
    "laboris",
    "nisi",
    "ut",
    "aliquip",
    "ex",
    "ea",
    "commodo",
    "consequat.",
]


class MockTokenizer:
    """Word-level: a token is a word with its leading white space; the vocabulary grows as seen.
    The lorem words have fixed ids, so copies (a runner in another process) agree on them; echo
    only hands back the ids it was given."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pieces: list[str] = list(_SPECIALS)
        self._ids: dict[str, int] = {p: i for i, p in enumerate(self._pieces)}
        self.encode(" ".join(LOREM))  # the lorem words first: their ids are fixed (tests use them)
        for char in _CHARS:
            self._id(char)
        self._num_fixed = len(self._pieces)

    def __getstate__(self) -> dict[str, object]:
        with self._lock:
            return {"pieces": list(self._pieces), "num_fixed": self._num_fixed}

    def __setstate__(self, state: dict[str, object]) -> None:
        self._lock = threading.Lock()
        self._pieces = list(state["pieces"])  # type: ignore[call-overload]
        self._ids = {p: i for i, p in enumerate(self._pieces)}
        self._num_fixed = int(state["num_fixed"])  # type: ignore[call-overload]

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return frozenset({END})

    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    def encode(self, text: str) -> list[int]:
        with self._lock:
            return [self._id(piece) for piece in _WORD.findall(text)]

    def token_id(self, piece: str) -> int:
        return self._ids[piece]

    # -- what the grammar library reads (text.grammar.PieceVocabulary) ---------------------
    @property
    def special_token_ids(self) -> frozenset[int]:
        return frozenset(range(len(_SPECIALS)))

    def grammar_pieces(self) -> list[bytes]:
        """The fixed vocabulary (specials, characters, lorem words); words echo learns later are
        never part of a constrained reply."""
        return [piece.encode() for piece in self._pieces[: self._num_fixed]]

    def encode_pieces(self, text: bytes) -> list[int]:
        """Character by character (the characters this vocabulary has)."""
        return [self._ids[c] for c in text.decode(errors="ignore") if c in self._ids]

    def apply_chat_template(self, messages: Sequence[ChatMessage]) -> list[int]:
        ids: list[int] = []
        for m in messages:
            ids += [_SPECIALS.index(f"<|{m.role}|>"), *self.encode(m.content), END]
        return [*ids, ASSISTANT]

    def decode(self, token_ids: Sequence[int]) -> str:
        pieces = self._pieces  # append-only: reading without the lock is safe
        return "".join(pieces[i] for i in token_ids if i >= len(_SPECIALS))

    def _id(self, piece: str) -> int:
        if piece not in self._ids:
            self._ids[piece] = len(self._pieces)
            self._pieces.append(piece)
        return self._ids[piece]


@dataclass(frozen=True, slots=True)
class MockConfig:
    mode: MockMode = "echo"
    delay_s: float = 0.0  # per step, whatever the batch size (as a batched forward)
    first_token_delay_s: float = 0.0  # extra, on steps that prefill
    lorem_tokens: int = 32
    context_window: int = 4096
    model_name: str = "mock"
    # a pretend KV pool the scheduler admits by (None: none); the mock keeps no KV, so a cached
    # prefix costs it nothing either way
    kv_blocks: int | None = None
    kv_block_size: int = 16
    prefix_caching: bool = True


class MockRunner:
    """echo: replies with the last user message (a plain prompt: the prompt), word by word.
    lorem: a fixed text of a set length."""

    def __init__(self, config: MockConfig | None = None) -> None:
        self.config = config or MockConfig()
        self._tokenizer = MockTokenizer()
        self._plans: dict[int, list[int]] = {}  # rid -> the reply it will give, then END
        self._cursor: dict[int, int] = {}
        self._num_logprobs: dict[int, int] = {}  # rid -> alternatives, for rids that asked

    @property
    def model_name(self) -> str:
        return self.config.model_name

    @property
    def tokenizer(self) -> MockTokenizer:
        return self._tokenizer

    @property
    def context_window(self) -> int:
        return self.config.context_window

    @property
    def info(self) -> dict[str, Any]:
        return {"runner": "mock", "mode": self.config.mode}

    @property
    def kv_spec(self) -> KVSpec | None:
        c = self.config
        if c.kv_blocks is None:
            return None
        return KVSpec(c.kv_blocks, c.kv_block_size, f"mock {c.mode}", c.prefix_caching)

    def step(self, batch: StepBatch) -> StepOutput:
        for rid in batch.released:
            self._plans.pop(rid, None)
            self._cursor.pop(rid, None)
            self._num_logprobs.pop(rid, None)
        if batch.is_empty:
            return StepOutput({})
        for new in batch.new:
            # resumed after a preemption: the same reply, from where it stopped
            prompt = new.prompt_ids[: len(new.prompt_ids) - new.num_generated]
            self._plans[new.rid] = self._plan(prompt)
            self._cursor[new.rid] = new.num_generated
            if new.params.logprobs is not None:
                self._num_logprobs[new.rid] = new.params.logprobs
        delay = self.config.delay_s + (self.config.first_token_delay_s if batch.new else 0.0)
        if delay > 0:
            time.sleep(delay)
        rids = [n.rid for n in batch.new] + list(batch.running)
        tokens = {rid: self._next(rid, batch.masks.get(rid)) for rid in rids}
        logprobs = {
            rid: _mock_logprobs(tokens[rid], self._cursor[rid], num_top)
            for rid, num_top in self._num_logprobs.items()
            if rid in tokens
        }
        return StepOutput(tokens, logprobs)

    def close(self) -> None:
        self._plans.clear()
        self._cursor.clear()
        self._num_logprobs.clear()

    def _next(self, rid: int, mask: bytes | None) -> int:
        plan, i = self._plans[rid], self._cursor[rid]
        self._cursor[rid] = i + 1
        token = plan[i] if i < len(plan) else END
        if mask is None or allowed(mask, token):
            return token
        return preferred_token(self._tokenizer, mask)

    def _plan(self, prompt_ids: Sequence[int]) -> list[int]:
        if self.config.mode == "lorem":
            n = self.config.lorem_tokens
            return self._tokenizer.encode(" ".join((LOREM * (n // len(LOREM) + 1))[:n]))
        ids = list(prompt_ids)
        starts = [i for i, t in enumerate(ids) if t == USER]
        if not starts:  # a plain prompt (the completions API): echoed whole
            return [t for t in ids if t >= len(_SPECIALS)]
        rest = ids[starts[-1] + 1 :]
        return rest[: rest.index(END)] if END in rest else rest


def preferred_token(tokenizer: MockTokenizer, mask: bytes) -> int:
    """What a constrained mock row samples: END, else the first of _CHARS the mask allows, else
    the lowest id it allows."""
    for piece in (_SPECIALS[END], *_CHARS):
        token = tokenizer.token_id(piece)
        if allowed(mask, token):
            return token
    return allowed_ids(mask)[0]


def _mock_logprobs(token_id: int, position: int, num_top: int) -> SampledLogprobs:
    """Deterministic and consistent: the sampled token is the most likely one, its logprob
    depends on the position only, and each alternative (lorem words, in order, other than the
    sampled token) is one nat less likely than the one before."""
    logprob = -0.125 * (position % 4)
    others = [i for i in range(len(_SPECIALS), len(_SPECIALS) + num_top + 1) if i != token_id]
    top_ids = (token_id, *others[: num_top - 1]) if num_top else ()
    return SampledLogprobs(logprob, top_ids, tuple(logprob - k for k in range(len(top_ids))))

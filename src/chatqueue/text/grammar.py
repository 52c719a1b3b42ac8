"""Constrained decoding with llguidance: a request's grammar compiled against the model's
vocabulary, and a matcher per sequence that says, each step, which tokens may come next.

NOTE: the design is vLLM's. The matchers live where the tokenizer is (the server process, on the
engine thread); each step a constrained sequence's matcher packs its allowed tokens into a bitmask
(one bit per token id, little-endian 32-bit words), which goes to the runner with the step; the
runner sets every other token's logit to -inf before sampling; the token sampled then advances the
matcher. llguidance was chosen over xgrammar by measurement (RESULTS.md): it needs neither torch
nor numpy here (a mask is `bytes`), so the server process stays free of torch, and it imports in
0.1 s where xgrammar took 2-4 s and +180 MB (torch, and a 1 GB triton install).

Compiling is the costly part (a tokenizer's vocabulary index ~0.5-1 s once; a grammar ~1 ms):
`GrammarCompiler` keeps both, and a compiled grammar is reused by copying its fresh matcher.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import llguidance

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

from chatqueue.errors import InvalidRequest
from chatqueue.types import GrammarSpec

# NOTE: no free whitespace: a small model given the choice fills the reply with newlines until
# max_tokens. The separators are json.dumps' own, which models imitate best.
JSON_OPTIONS: JsonCompileOptions = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}


class GrammarError(InvalidRequest):
    """The grammar library cannot compile what the request asked for."""


@runtime_checkable
class JsonVocabulary(Protocol):
    """A tokenizer llguidance can read whole: a Hugging Face `tokenizer.json` (HFTokenizer)."""

    @property
    def eos_token_ids(self) -> frozenset[int]: ...

    @property
    def vocab_size(self) -> int: ...

    def tokenizer_json(self) -> str: ...


@runtime_checkable
class PieceVocabulary(Protocol):
    """A tokenizer with a fixed list of pieces that spells every reply it may be asked to
    constrain (the mock's), and a way to encode text with those pieces only."""

    @property
    def eos_token_ids(self) -> frozenset[int]: ...

    @property
    def special_token_ids(self) -> frozenset[int]: ...

    def grammar_pieces(self) -> list[bytes]: ...

    def encode_pieces(self, text: bytes) -> list[int]: ...


class GrammarMatcher:
    """One sequence's place in its grammar. Used by the engine thread only."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self._matcher = matcher

    def mask(self) -> bytes:
        """The tokens allowed next, one bit per token id (EOS only once the grammar is done)."""
        return self._matcher.compute_bitmask()

    def advance(self, token_id: int) -> bool:
        """Take the token sampled; False if the grammar does not allow it."""
        return self._matcher.consume_token(token_id)

    @property
    def is_accepting(self) -> bool:
        return self._matcher.is_accepting()

    @property
    def error(self) -> str:
        return self._matcher.get_error()


class GrammarCompiler:
    """Compiles grammars for one tokenizer, and caches them by spec. Thread-safe; slow calls
    (the vocabulary index, a compile) belong off the event loop."""

    def __init__(self, tokenizer: object, *, max_cached: int = 256) -> None:
        self.tokenizer = tokenizer
        self._vocabulary: llguidance.LLTokenizer | None = None
        self._compiled: OrderedDict[GrammarSpec, llguidance.LLMatcher] = OrderedDict()
        self._max_cached = max_cached
        self._lock = threading.Lock()

    def matcher(self, spec: GrammarSpec) -> GrammarMatcher:
        """A fresh matcher for `spec`; raises GrammarError (naming why) if it cannot compile."""
        with self._lock:
            fresh = self._compiled.get(spec)
            if fresh is None:
                fresh = self._compile(spec)
                self._compiled[spec] = fresh
                if len(self._compiled) > self._max_cached:
                    self._compiled.popitem(last=False)
            else:
                self._compiled.move_to_end(spec)
            return GrammarMatcher(fresh.deep_copy())

    def _compile(self, spec: GrammarSpec) -> llguidance.LLMatcher:
        vocabulary = self.vocabulary()
        try:
            grammar = _grammar_text(spec)
        except ValueError as exc:
            raise GrammarError(f"The grammar cannot be compiled: {exc}", param=spec.param) from exc
        error = llguidance.LLMatcher.validate_grammar(grammar, vocabulary)
        if error:
            raise GrammarError(
                f"The schema cannot be used to constrain the reply: {error}", param=spec.param
            )
        matcher = llguidance.LLMatcher(vocabulary, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(
                f"The schema cannot be used to constrain the reply: {matcher.get_error()}",
                param=spec.param,
            )
        return matcher

    def vocabulary(self) -> llguidance.LLTokenizer:
        """llguidance's index of the tokenizer's vocabulary, built on first use (~0.5-1 s)."""
        if self._vocabulary is None:
            self._vocabulary = _vocabulary_of(self.tokenizer)
        return self._vocabulary


def _grammar_text(spec: GrammarSpec) -> str:
    match spec.kind:
        case "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema(
                {"type": "object"}, defaults=JSON_OPTIONS
            )
        case "json_schema":
            return llguidance.LLMatcher.grammar_from_json_schema(spec.source, defaults=JSON_OPTIONS)
        case "lark":
            return llguidance.LLMatcher.grammar_from_lark(spec.source)


def _vocabulary_of(tokenizer: object) -> llguidance.LLTokenizer:
    eos = sorted(getattr(tokenizer, "eos_token_ids", ()))
    if isinstance(tokenizer, JsonVocabulary):
        try:
            return llguidance.LLTokenizer(
                tokenizer.tokenizer_json(), n_vocab=tokenizer.vocab_size, eos_token=eos
            )
        except ValueError as exc:
            raise GrammarError(
                f"This model's tokenizer cannot be used for constrained output: {exc}",
                param="response_format",
            ) from exc
    if isinstance(tokenizer, PieceVocabulary):
        pieces = _Pieces(
            tokenizer.grammar_pieces(),
            eos[0],
            tokenizer.encode_pieces,
            special_token_ids=sorted(tokenizer.special_token_ids),
        )
        return llguidance.LLTokenizer(llguidance.TokenizerWrapper(pieces), eos_token=eos)
    raise GrammarError(
        f"This model's tokenizer ({type(tokenizer).__name__}) cannot be used for constrained "
        "output.",
        param="response_format",
    )


@dataclass
class _Pieces:
    """What llguidance's TokenizerWrapper reads of a tokenizer."""

    tokens: Sequence[bytes]
    eos_token_id: int
    encode: Callable[[bytes], list[int]]
    bos_token_id: int | None = None
    special_token_ids: Sequence[int] = ()

    def __call__(self, text: bytes) -> list[int]:
        return self.encode(text)

"""Structured output without a model: the sampler's masks, the mock's tokenizer through the
grammar library, and tool calls parsed out of a stream."""

from __future__ import annotations

import json

import pytest
import torch

from chatqueue.engine.hf.sampling import MIN_LOGPROB, SamplingBatch, SamplingRequest, apply_masks
from chatqueue.engine.mock import END, MockTokenizer, preferred_token
from chatqueue.engine.runner import StepBatch, allowed, allowed_ids, row_masks
from chatqueue.text.grammar import GrammarCompiler, GrammarError
from chatqueue.text.tool_calls import (
    ArgumentsDelta,
    CallStart,
    ContentDelta,
    ToolCallFormat,
    ToolCallParser,
    call_grammar,
    parse_reply,
)
from chatqueue.types import GrammarSpec, SamplingParams, ToolSpec

VOCAB = 70


def mask_of(ids: list[int], vocab: int = VOCAB) -> bytes:
    words = [0] * ((vocab + 31) // 32)
    for i in ids:
        words[i // 32] |= 1 << (i % 32)
    return b"".join(w.to_bytes(4, "little") for w in words)


def batch(*params: SamplingParams) -> SamplingBatch:
    requests = [SamplingRequest(p, [1, 2]) for p in params]
    return SamplingBatch.create(requests, vocab_size=VOCAB, device=torch.device("cpu"))


# -- the mask layout and the sampler -------------------------------------------------------------
def test_mask_helpers_agree_on_the_layout() -> None:
    mask = mask_of([0, 5, 33, 69])
    assert allowed_ids(mask) == [0, 5, 33, 69]
    assert allowed(mask, 33) and not allowed(mask, 34) and not allowed(mask, 10_000)


def test_row_masks_are_none_when_no_row_has_one() -> None:
    step = StepBatch(new=[], running=[1, 2], released=[], masks={2: b"\x01"})
    assert row_masks(step, [1, 2]) == [None, b"\x01"]
    assert row_masks(step, [1]) is None
    assert row_masks(StepBatch(new=[], running=[1], released=[]), [1]) is None


def test_apply_masks_touches_only_masked_rows() -> None:
    logits = torch.randn(3, VOCAB)
    before = logits.clone()
    apply_masks(logits, [None, mask_of([7, 40]), None])
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    kept = torch.isfinite(logits[1]).nonzero().flatten().tolist()
    assert kept == [7, 40] and torch.equal(logits[1, [7, 40]], before[1, [7, 40]])


def test_ids_past_the_mask_are_not_allowed() -> None:
    logits = torch.zeros(1, VOCAB + 40)  # the model has more rows than the tokenizer
    apply_masks(logits, [mask_of([3])])
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [3]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_masked_row_samples_only_allowed_tokens(temperature: float) -> None:
    params = SamplingParams(temperature=temperature, seed=3, logprobs=2)
    sampling = batch(params, params)
    masks = [mask_of([11, 12]), None]
    for _ in range(20):
        logits = torch.randn(2, VOCAB)
        logits[0, 50] = 100.0  # the model's favourite, which the grammar forbids
        sampled = sampling.sample(logits, masks=masks)
        assert sampled.tokens[0].item() in (11, 12)
        assert sampled.logprobs is not None
        per_row = sampled.logprobs.per_row()
        # the processed logprobs: the forbidden favourite is not among the alternatives
        assert 50 not in per_row[0].top_ids and per_row[0].logprob > MIN_LOGPROB


# -- the grammar library with the mock's vocabulary ----------------------------------------------
def walk(compiler: GrammarCompiler, spec: GrammarSpec, tokenizer: MockTokenizer) -> str:
    """What the mock runner does: its preferred token among those allowed, until END."""
    matcher, out = compiler.matcher(spec), []
    for _ in range(500):
        token = preferred_token(tokenizer, matcher.mask())
        if token == END:
            assert matcher.is_accepting
            return tokenizer.decode(out)
        assert matcher.advance(token)
        out.append(token)
    raise AssertionError("the grammar never let the reply end")


SCHEMAS = [
    {"type": "object"},
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 2},
            "age": {"type": "integer", "minimum": 18},
            "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1},
            "pet": {"anyOf": [{"type": "null"}, {"type": "object"}]},
        },
        "required": ["name", "age", "tags", "pet"],
    },
]


@pytest.mark.parametrize("schema", SCHEMAS)
def test_the_mock_spells_a_valid_reply_for_a_schema(schema: dict[str, object]) -> None:
    tokenizer = MockTokenizer()
    text = walk(GrammarCompiler(tokenizer), GrammarSpec.json_schema(schema), tokenizer)
    value = json.loads(text)
    assert isinstance(value, dict) and set(value) >= set(schema.get("required", []))  # type: ignore[arg-type]


def test_a_schema_that_cannot_compile_is_an_invalid_request_naming_why() -> None:
    compiler = GrammarCompiler(MockTokenizer())
    with pytest.raises(GrammarError, match="strin") as caught:
        compiler.matcher(GrammarSpec.json_schema({"type": "strin"}))
    assert caught.value.param == "response_format"


def test_matchers_from_the_cache_are_fresh() -> None:
    tokenizer = MockTokenizer()
    compiler = GrammarCompiler(tokenizer)
    spec = GrammarSpec("json_object")
    first = compiler.matcher(spec)
    assert first.advance(tokenizer.encode_pieces(b"{")[0])
    second = compiler.matcher(spec)
    assert allowed_ids(second.mask()) == tokenizer.encode_pieces(b"{")  # at the start again


@pytest.mark.parametrize("fmt", list(ToolCallFormat))
def test_a_forced_call_parses_back_as_the_call(fmt: ToolCallFormat) -> None:
    tokenizer = MockTokenizer()
    tools = [
        ToolSpec("add", parameters={"type": "object", "properties": {"a": {"type": "integer"}}}),
        ToolSpec("noop"),
    ]
    text = walk(GrammarCompiler(tokenizer), call_grammar(tools[:1], fmt), tokenizer)
    reply = parse_reply(text, fmt)
    assert reply.content == ""
    assert [name for name, _ in reply.calls] == ["add"]
    assert isinstance(json.loads(reply.calls[0][1]), dict)


# -- tool calls out of a stream ------------------------------------------------------------------
HERMES = (
    'Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
    '"when": {"days": [1, 2]}}}\n</tool_call>\n<tool_call>\n{"name": "noop", "arguments": {}}'
    "\n</tool_call>"
)
LLAMA = (
    '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "noop", "parameters": {}}'
)


def streamed(
    fmt: ToolCallFormat, text: str, size: int
) -> tuple[str, dict[int, str], dict[int, str]]:
    parser = ToolCallParser(fmt)
    deltas = []
    for i in range(0, len(text), size):
        deltas += parser.push(text[i : i + size])
    deltas += parser.finish()
    content = "".join(d.text for d in deltas if isinstance(d, ContentDelta))
    names = {d.index: d.name for d in deltas if isinstance(d, CallStart)}
    arguments: dict[int, str] = {}
    for d in deltas:
        if isinstance(d, ArgumentsDelta):
            assert d.index in names, "a call's name comes before its arguments"
            arguments[d.index] = arguments.get(d.index, "") + d.text
    return content, names, arguments


@pytest.mark.parametrize("size", [1, 2, 7, 1000])
def test_hermes_calls_stream_the_same_in_any_pieces(size: int) -> None:
    content, names, arguments = streamed(ToolCallFormat.HERMES, HERMES, size)
    assert content == "Let me check. "
    assert names == {0: "get_weather", 1: "noop"}
    assert json.loads(arguments[0]) == {"city": "Paris", "when": {"days": [1, 2]}}
    assert arguments[1] == "{}"


@pytest.mark.parametrize("size", [1, 3, 1000])
def test_llama3_json_calls(size: int) -> None:
    content, names, arguments = streamed(ToolCallFormat.LLAMA3_JSON, LLAMA, size)
    assert content == "" and names == {0: "get_weather", 1: "noop"}
    assert json.loads(arguments[0]) == {"city": "Paris"} and arguments[1] == "{}"


@pytest.mark.parametrize(
    ("fmt", "text"),
    [
        (ToolCallFormat.HERMES, "a < b, and <tool_c is not a tag"),
        (ToolCallFormat.HERMES, "<tool_call>{not json}</tool_call> done"),
        (ToolCallFormat.LLAMA3_JSON, 'Hello {"name": "x"}'),
    ],
)
def test_text_that_is_no_call_stays_content(fmt: ToolCallFormat, text: str) -> None:
    for size in (1, 4, 1000):
        content, names, _ = streamed(fmt, text, size)
        assert (content, names) == (text, {})


def test_a_call_cut_short_keeps_what_was_told() -> None:
    reply = parse_reply('<tool_call>{"name": "f", "arguments": {"x": 1', ToolCallFormat.HERMES)
    assert reply.calls == [("f", '{"x": 1')]

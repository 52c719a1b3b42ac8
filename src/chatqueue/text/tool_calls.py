"""Tool calls in the model's own words: which format a model writes them in, the grammar that makes
it write one (`tool_choice` required or a named function), and a parser that takes them out of the
reply as it streams.

Two formats:
- `hermes` (Hermes, Qwen 2.5/3 and most templates with tools):
  `<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>`, one block per call, anywhere
  in the reply; the text around them is the message's content.
- `llama3_json` (Llama 3.1-3.3's JSON tool calling): the whole reply is
  `{"name": "f", "parameters": {...}}` (optionally after `<|python_tag|>`), several joined by `;`.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from chatqueue.text.grammar import JSON_OPTIONS
from chatqueue.types import GrammarSpec, ToolSpec


class ToolCallFormat(enum.StrEnum):
    HERMES = "hermes"
    LLAMA3_JSON = "llama3_json"

    @property
    def arguments_key(self) -> str:
        return "arguments" if self is ToolCallFormat.HERMES else "parameters"


def detect_format(chat_template: str | None) -> ToolCallFormat:
    """The format a chat template teaches its model; hermes unless it is Llama 3's."""
    template = chat_template or ""
    if "<tool_call>" not in template and ("<|python_tag|>" in template or "<|eom_id|>" in template):
        return ToolCallFormat.LLAMA3_JSON
    return ToolCallFormat.HERMES


# -- the grammar of a forced call ---------------------------------------------------------------
def call_grammar(
    tools: Sequence[ToolSpec], fmt: ToolCallFormat, *, parallel: bool = True
) -> GrammarSpec:
    """A Lark grammar (llguidance's dialect) for a reply that is tool calls only: one call of
    one of `tools` (give one tool for a named function), or several when `parallel`."""
    assert tools, "a forced call needs a tool to call"
    alternatives = " | ".join(f"call_{i}" for i in range(len(tools)))
    rules = [f"call: {alternatives}"]
    for i, tool in enumerate(tools):
        schema = {
            "type": "object",
            "properties": {
                "name": {"const": tool.name},
                fmt.arguments_key: dict(tool.parameters) or {"type": "object"},
            },
            "required": ["name", fmt.arguments_key],
            "additionalProperties": False,
            "x-guidance": JSON_OPTIONS,
        }
        json_rule = f"%json {json.dumps(schema)}"
        if fmt is ToolCallFormat.HERMES:
            rules.append(f'call_{i}: "<tool_call>\\n" {json_rule} "\\n</tool_call>"')
        else:
            rules.append(f"call_{i}: {json_rule}")
    separator = '"\\n"' if fmt is ToolCallFormat.HERMES else '"; "'
    start = f"start: call ({separator} call)*" if parallel else "start: call"
    return GrammarSpec("lark", "\n".join([start, *rules]), param="tool_choice")


# -- parsing a streamed reply --------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ContentDelta:
    text: str


@dataclass(frozen=True, slots=True)
class CallStart:
    """A call begins: its position among the reply's calls and the function's name."""

    index: int
    name: str


@dataclass(frozen=True, slots=True)
class ArgumentsDelta:
    """More of call `index`'s arguments (JSON text; the fragments joined are the whole)."""

    index: int
    text: str


Delta = ContentDelta | CallStart | ArgumentsDelta

_OPEN, _CLOSE, _PYTHON_TAG = "<tool_call>", "</tool_call>", "<|python_tag|>"
_HEAD = re.compile(
    r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"(?:arguments|parameters)"\s*:\s*'
)
_DECODER = json.JSONDecoder()


@dataclass(slots=True)
class _Call:
    """A call being read: its text since the opening, what of it was sent."""

    index: int
    text: str = ""
    name: str = ""
    name_sent: bool = False
    args_start: int | None = None  # where the arguments' JSON starts in `text`
    args_sent: int = 0  # characters of the arguments sent


@dataclass(slots=True)
class ToolCallParser:
    """Feed it the reply's text as it comes (`push`), then `finish`; it returns what can be told
    now: content, a call's start (its name), its arguments' fragments. Text that may yet turn out
    to be a call (`<tool_c...`) is held back until it is known."""

    fmt: ToolCallFormat
    _pending: str = ""  # content not yet sent (maybe the start of a call)
    _call: _Call | None = None
    _num_calls: int = 0
    _content_only: bool = False  # llama3_json: the reply is not calls
    calls: list[tuple[str, str]] = field(default_factory=list)  # (name, arguments) each ended

    def push(self, text: str) -> list[Delta]:
        out: list[Delta] = []
        self._pending += text
        self._advance(out, final=False)
        return out

    def finish(self) -> list[Delta]:
        out: list[Delta] = []
        self._advance(out, final=True)
        if self._call is not None:  # the reply ended inside a call
            self._end_call(self._call.text, out, closed=False)
        if self._pending:
            out.append(ContentDelta(self._pending))
            self._pending = ""
        return out

    # -- the states -----------------------------------------------------------------------
    def _advance(self, out: list[Delta], *, final: bool) -> None:
        while True:
            if self._call is not None:
                if not self._read_call(out):
                    return
            elif not self._read_content(out, final=final):
                return

    def _read_content(self, out: list[Delta], *, final: bool) -> bool:
        """Send what is content; True when a call has begun (and `_call` is set)."""
        if self.fmt is ToolCallFormat.HERMES:
            start = self._pending.find(_OPEN)
            if start < 0:
                keep = 0 if final else _partial_suffix(self._pending, _OPEN)
                self._send_content(len(self._pending) - keep, out)
                return False
            self._send_content(start, out)
            self._pending = self._pending[len(_OPEN) :]
        else:  # llama3_json: the reply is calls when it starts with an object
            if self._content_only:
                self._send_content(len(self._pending), out)
                return False
            body = self._pending.lstrip()
            if self._num_calls and body.startswith(";"):  # another call follows
                body = body[1:].lstrip()
            tagged = body.startswith(_PYTHON_TAG)
            if tagged:
                body = body[len(_PYTHON_TAG) :].lstrip()
            if not final and (not body or (not tagged and _PYTHON_TAG.startswith(body))):
                return False  # nothing but white space (or the tag's start) yet
            if not body.startswith("{"):
                self._content_only = True
                self._send_content(len(self._pending), out)
                return False
            self._pending = body
        self._call = _Call(self._num_calls)
        self._num_calls += 1
        return True

    def _read_call(self, out: list[Delta]) -> bool:
        """Take the pending text into the call; True when the call ended (content follows)."""
        call = self._call
        assert call is not None
        call.text += self._pending
        self._pending = ""
        if self.fmt is ToolCallFormat.HERMES:
            end = call.text.find(_CLOSE)
            if end < 0:
                self._stream_call(call, out)
                return False
            self._pending = call.text[end + len(_CLOSE) :]
            self._end_call(call.text[:end], out, closed=True)
            return True
        try:
            _, end = _DECODER.raw_decode(call.text.lstrip())
        except json.JSONDecodeError:
            self._stream_call(call, out)
            return False
        body = call.text.lstrip()
        self._pending = body[end:]
        self._end_call(body[:end], out, closed=True)
        return True

    def _stream_call(self, call: _Call, out: list[Delta]) -> None:
        """Send the name as soon as it is known, then the arguments as they grow."""
        if not call.name_sent:
            head = _HEAD.match(call.text)
            if head is None:
                return
            if not call.text[head.end() :].startswith("{"):
                return  # arguments that are not an object: sent whole at the end
            call.name = json.loads(head.group(1))
            out.append(CallStart(call.index, call.name))
            call.name_sent, call.args_start = True, head.end()
        assert call.args_start is not None
        args = call.text[call.args_start :]
        try:
            _, end = _DECODER.raw_decode(args)
            args = args[:end]  # complete: what follows is the call's own closing
        except json.JSONDecodeError:
            pass  # incomplete: all of it belongs to the arguments
        if len(args) > call.args_sent:
            out.append(ArgumentsDelta(call.index, args[call.args_sent :]))
            call.args_sent = len(args)

    def _end_call(self, text: str, out: list[Delta], *, closed: bool) -> None:
        call, self._call = self._call, None
        assert call is not None
        call.text = text
        self._stream_call(call, out)
        parsed = _parse_call(text, self.fmt)
        if parsed is None:
            if call.name_sent:  # cut short (max_tokens) after it was told: what there is of it
                assert call.args_start is not None
                start = call.args_start
                self.calls.append((call.name, call.text[start : start + call.args_sent]))
                return
            self._num_calls -= 1
            is_hermes = self.fmt is ToolCallFormat.HERMES
            raw = f"{_OPEN}{text}{_CLOSE if closed else ''}" if is_hermes else text
            out.append(ContentDelta(raw))
            return
        name, arguments = parsed
        if not call.name_sent:
            out.append(CallStart(call.index, name))
            out.append(ArgumentsDelta(call.index, arguments))
        elif call.args_sent < len(arguments):
            out.append(ArgumentsDelta(call.index, arguments[call.args_sent :]))
        self.calls.append((name, arguments))

    def _send_content(self, end: int, out: list[Delta]) -> None:
        if end > 0:
            text, self._pending = self._pending[:end], self._pending[end:]
            if not (self._num_calls and text.isspace()):  # the space between calls is no content
                out.append(ContentDelta(text))


def _parse_call(text: str, fmt: ToolCallFormat) -> tuple[str, str] | None:
    """(name, arguments JSON text) of a whole call, or None if it is not one. The arguments
    text is as generated (so that streamed fragments add up to it)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments: Any = obj.get(fmt.arguments_key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(arguments, str):
        return obj["name"], arguments
    head = _HEAD.match(text)
    if head is not None and isinstance(arguments, dict):
        _, end = _DECODER.raw_decode(text, head.end())
        return obj["name"], text[head.end() : end]
    return obj["name"], json.dumps(arguments)


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that `marker` starts with (it may be coming)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


@dataclass(frozen=True, slots=True)
class ParsedReply:
    content: str
    calls: list[tuple[str, str]]  # (name, arguments JSON text)


def parse_reply(text: str, fmt: ToolCallFormat) -> ParsedReply:
    """A whole reply's content and calls (the non-streamed response)."""
    parser = ToolCallParser(fmt)
    deltas = parser.push(text) + parser.finish()
    content = "".join(d.text for d in deltas if isinstance(d, ContentDelta))
    return ParsedReply(content, parser.calls)

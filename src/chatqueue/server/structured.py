"""What a request's `response_format`, `tools` and `tool_choice` ask of the reply: the grammar it
must follow (or none), checked against each other at the edge."""

from __future__ import annotations

from chatqueue.errors import InvalidRequest
from chatqueue.server.schemas import ChatCompletionRequest, OpenAIRequest
from chatqueue.text.tool_calls import ToolCallFormat, call_grammar
from chatqueue.types import GrammarSpec


def request_grammar(body: OpenAIRequest, fmt: ToolCallFormat) -> GrammarSpec | None:
    """The grammar the reply must follow: `response_format`'s, or, when `tool_choice` is
    required or names a function, the grammar of a call (so the model must call)."""
    grammar = body.response_format.grammar() if body.response_format else None
    if not isinstance(body, ChatCompletionRequest):
        return grammar
    mode, tools = body.tool_choice_mode, body.offered_tools
    if mode in ("none", "auto"):
        return grammar
    if not tools:
        raise InvalidRequest(f"tool_choice {mode!r} needs tools.", param="tool_choice")
    if mode != "required":
        tools = [t for t in tools if t.name == mode]
        if not tools:
            raise InvalidRequest(
                f"tool_choice names the function {mode!r}, which is not among the tools.",
                param="tool_choice",
            )
    if grammar is not None:
        raise InvalidRequest(
            "response_format cannot be combined with a tool_choice that forces a call.",
            param="response_format",
        )
    parallel = mode == "required" and body.parallel_tool_calls is not False
    return call_grammar(tools, fmt, parallel=parallel)

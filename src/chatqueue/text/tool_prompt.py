"""Tools and tool messages in a prompt. A chat template that knows tools gets them as they are
(`template_messages` + `tools=` in apply_chat_template). For one that does not (SmolLM2's, the
mock's), `render_in_prompt` turns the conversation into plain system/user/assistant messages:
the tools described in the system prompt, in the format the model is to answer in (the
Hermes-style prompt, or Llama 3's JSON prompt); an assistant's calls written as it would write
them; a tool's result as a user message in `<tool_response>` tags."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from typing import Any

from chatqueue.text.tokenizer import Tokenizer, ToolTemplate
from chatqueue.text.tool_calls import ToolCallFormat, detect_format
from chatqueue.types import ChatMessage, ToolCall, ToolSpec

_HERMES_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""

_LLAMA3_PROMPT = """Given the following functions, please respond with a JSON for a function call with its proper arguments that best answers the given prompt.

Respond in the format {{"name": function name, "parameters": dictionary of argument name and its value}}. Do not use variables.

{tools}"""


def format_for(tokenizer: Tokenizer, configured: ToolCallFormat | None) -> ToolCallFormat:
    """How the model writes tool calls: as configured, else as its chat template teaches."""
    if configured is not None:
        return configured
    return detect_format(tokenizer.chat_template if isinstance(tokenizer, ToolTemplate) else None)


def prompt_encoder(
    tokenizer: Tokenizer,
    messages: Sequence[ChatMessage],
    tools: Sequence[ToolSpec],
    fmt: ToolCallFormat,
) -> Callable[[], list[int]]:
    """The call that makes the prompt's token ids (for the tokenizer thread): the template with
    the tools where it knows them, else the conversation rendered for a template without."""
    if not needs_rendering(messages, tools):
        return functools.partial(tokenizer.apply_chat_template, list(messages))
    if isinstance(tokenizer, ToolTemplate) and tokenizer.supports_tools:
        return functools.partial(
            tokenizer.apply_chat_template_with_tools, list(messages), list(tools)
        )
    return functools.partial(tokenizer.apply_chat_template, render_in_prompt(messages, tools, fmt))


def needs_rendering(messages: Sequence[ChatMessage], tools: Sequence[ToolSpec]) -> bool:
    """Whether anything in the conversation is about tools (else it goes to the template as is)."""
    return bool(tools) or any(m.role == "tool" or m.tool_calls for m in messages)


def render_in_prompt(
    messages: Sequence[ChatMessage], tools: Sequence[ToolSpec], fmt: ToolCallFormat
) -> list[ChatMessage]:
    """The conversation for a template without tools: system, user and assistant messages only."""
    out = [_plain(m, fmt) for m in messages]
    if not tools:
        return out
    listing = "\n".join(json.dumps(t.as_openai()) for t in tools)
    prompt = (_HERMES_PROMPT if fmt is ToolCallFormat.HERMES else _LLAMA3_PROMPT).format(
        tools=listing
    )
    if out and out[0].role == "system":
        return [ChatMessage("system", f"{out[0].content}\n\n{prompt}"), *out[1:]]
    return [ChatMessage("system", prompt), *out]


def _plain(message: ChatMessage, fmt: ToolCallFormat) -> ChatMessage:
    if message.role == "tool":
        return ChatMessage("user", f"<tool_response>\n{message.content}\n</tool_response>")
    if message.tool_calls:
        calls = [written_call(call, fmt) for call in message.tool_calls]
        joiner = "\n" if fmt is ToolCallFormat.HERMES else "; "
        text = joiner.join(calls)
        return ChatMessage("assistant", f"{message.content}\n{text}" if message.content else text)
    return message


def written_call(call: ToolCall, fmt: ToolCallFormat) -> str:
    """A call as the model writes it in `fmt`."""
    body = f'{{"name": {json.dumps(call.name)}, "{fmt.arguments_key}": {call.arguments or "{}"}}}'
    return f"<tool_call>\n{body}\n</tool_call>" if fmt is ToolCallFormat.HERMES else body


def template_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """The conversation as templates with tools read it (OpenAI's shape; a call's arguments as
    an object, which templates print with `tojson`)."""
    out: list[dict[str, Any]] = []
    for m in messages:
        entry: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            entry["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": _arguments(call.arguments)},
                }
                for call in m.tool_calls
            ]
        if m.tool_call_id is not None:
            entry["tool_call_id"] = m.tool_call_id
        out.append(entry)
    return out


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text

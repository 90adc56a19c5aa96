"""The one tool-call format of rltrain, and its parser (design decision 2).

The model calls a tool by writing a Hermes-style block (Qwen2.5's own format)::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

one block per call, any number of blocks. Training and evaluation see the same text, and the gateway uses this
one parser for every engine, so what the policy learns to write is exactly what the gateway understands.

A block without ``arguments`` is a call with no arguments. A completion either parses completely or is returned
as plain text: if any block is malformed (bad JSON, no ``name``, ``arguments`` not an object, a name that is not
one of the request's tools, a block left open), no tool call is returned, the whole text stays the message
content, and :attr:`ParsedOutput.error` says what was wrong. That error is recorded in the llm span; it is
never an exception, because a malformed call is the policy's mistake to be trained away, not a gateway failure.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
_BLOCK = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)" + re.escape(TOOL_CALL_CLOSE), re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    """One parsed call. ``arguments`` is a JSON object serialised as a string, as the OpenAI API sends it."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_openai(self) -> dict[str, Any]:
        """The call as an OpenAI ``message.tool_calls`` item."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(frozen=True)
class ParsedOutput:
    """A completion split into text and tool calls.

    ``content`` is the text outside the blocks (``None`` when there is none, as OpenAI returns it next to tool
    calls) or, when nothing parsed, the whole completion. ``error`` is set only when the text tried to call a
    tool and failed.
    """

    content: str | None
    tool_calls: list[ToolCall]
    error: str | None = None


def format_tool_call(name: str, arguments: dict[str, Any] | str) -> str:
    """The block for one call, as the fallback chat format renders it and as the model is asked to write it.

    ``arguments`` is an object, or its JSON text (kept verbatim, so a history with malformed arguments is
    rendered as it was written rather than silently repaired)."""
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return f'{TOOL_CALL_OPEN}\n{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments": {args}}}\n{TOOL_CALL_CLOSE}'


def parse_tool_calls(text: str, allowed_names: Collection[str] | None = None) -> ParsedOutput:
    """Split ``text`` into content and tool calls; ``allowed_names`` are the request's tool names
    (``None``: any name is accepted)."""
    if TOOL_CALL_OPEN not in text:
        return ParsedOutput(content=text, tool_calls=[])
    blocks = list(_BLOCK.finditer(text))
    outside = _BLOCK.sub("", text)
    errors: list[str] = []
    calls: list[ToolCall] = []
    for number, block in enumerate(blocks, start=1):
        call_or_error = _parse_block(block.group(1), allowed_names)
        if isinstance(call_or_error, ToolCall):
            calls.append(call_or_error)
        else:
            errors.append(f"tool call {number}: {call_or_error}")
    if TOOL_CALL_OPEN in outside:
        errors.append(
            f"a {TOOL_CALL_OPEN} block is not closed by {TOOL_CALL_CLOSE} (was the completion cut by max_tokens?)"
        )
    if errors:
        return ParsedOutput(content=text, tool_calls=[], error="; ".join(errors))
    return ParsedOutput(content=outside.strip() or None, tool_calls=calls)


def _parse_block(body: str, allowed_names: Collection[str] | None) -> ToolCall | str:
    """One block's call, or what is wrong with it."""
    try:
        payload = json.loads(body)
    except json.JSONDecodeError as exc:
        return f"invalid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}): {body.strip()[:200]!r}"
    if not isinstance(payload, dict):
        return f'expected a JSON object {{"name": ..., "arguments": {{...}}}}, got {type(payload).__name__}'
    name = payload.get("name")
    if not isinstance(name, str) or not name:
        return f'"name" must be a non-empty string, got {name!r}'
    if allowed_names is not None and name not in allowed_names:
        return f"unknown tool {name!r}; the request's tools are {sorted(allowed_names)}"
    arguments = payload.get("arguments", {})
    if not isinstance(arguments, dict):
        return f'"arguments" of {name!r} must be a JSON object, got {type(arguments).__name__}: {arguments!r:.100}'
    return ToolCall(name=name, arguments=json.dumps(arguments, ensure_ascii=False))

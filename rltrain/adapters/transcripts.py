"""Spans -> a readable transcript of one rollout, for APO's critic.

APO improves a prompt template by showing an LLM critic what the agent did and how it was scored. The critic
needs the conversation as the model last saw it (the final llm call's messages, which contain the whole
history), what the model answered (text and tool calls), what the tools returned or raised, the reward and,
when the grader logged one, the parsed answer next to the expected one. Tokens play no part here.

Like the trajectory adapter, only the spans of the rollout's final attempt are read.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict

from rltrain.adapters.trajectories import span_order
from rltrain.types import Rollout, Span, SpanKind

GRADE_SPAN = "grade"
"""Name of the log span in which an environment's grader records ``choice``, ``expected`` and ``correct``."""


class _Record(BaseModel):
    """Unknown fields are errors, as for the records of :mod:`rltrain.types`."""

    model_config = ConfigDict(extra="forbid")


class ToolRecord(_Record):
    """One tool call the agent made, as its tool span recorded it."""

    name: str
    arguments: dict[str, Any]
    result: Any = None
    error: str | None = None


class GradeRecord(_Record):
    """What the grader read out of the answer (``choice``, ``None`` when unparseable) and what it expected."""

    choice: str | None = None
    expected: str | None = None
    correct: bool | None = None


class Transcript(_Record):
    """One rollout as the critic reads it."""

    rollout_id: str
    task_id: str
    messages: list[dict[str, Any]]
    output_text: str | None = None
    output_tool_calls: list[dict[str, Any]] = []
    tools: list[ToolRecord] = []
    errors: list[str] = []
    reward: float | None = None
    grade: GradeRecord | None = None

    def render(self, max_chars: int = 4000) -> str:
        """Plain text for an LLM to read, at most ``max_chars`` long.

        The header (reward and grade) always survives; a body that is too long loses its middle, marked with
        the number of characters left out, so that the start of the conversation (the system prompt APO
        rewrites, the request) and the end (the tool log, errors and the model's final output) stay visible.
        """
        if max_chars < 1:
            raise ValueError(f"max_chars must be positive, got {max_chars}")
        header = self._header()
        if len(header) >= max_chars:
            return header[:max_chars]
        return header + _elide_middle(self._body(), max_chars - len(header))

    def _header(self) -> str:
        lines = [f"rollout {self.rollout_id} (task {self.task_id})", f"reward: {_fmt(self.reward)}"]
        if self.grade is not None:
            g = self.grade
            choice = "(unparseable)" if g.choice is None else g.choice
            lines.append(f"answer: {choice}   expected: {_fmt(g.expected)}   correct: {_fmt(g.correct)}")
        return "\n".join(lines) + "\n\n"

    def _body(self) -> str:
        # The model's final output goes last so that cutting the middle never hides it.
        parts = ["## conversation"]
        parts += [_render_message(m) for m in self.messages]
        if self.tools:
            parts.append("## tool calls made during the rollout")
            parts += [_render_tool(t) for t in self.tools]
        if self.errors:
            parts.append("## errors")
            parts += self.errors
        parts.append("## model output")
        if self.output_text:
            parts.append(self.output_text)
        parts += [f"tool call: {_render_tool_call(c)}" for c in self.output_tool_calls]
        if not self.output_text and not self.output_tool_calls:
            parts.append("(no output)")
        return "\n".join(parts)


def transcript_of(rollout: Rollout, spans: list[Span], tag: str | None = None) -> Transcript:
    """The transcript of ``rollout`` from its spans (final attempt only). With ``tag``, the "final llm call"
    is the last one carrying that tag (an agent with several roles is critiqued per role)."""
    final = [s for s in spans if s.attempt_no == rollout.attempt_count]
    final.sort(key=span_order)
    last_call: dict[str, Any] | None = None
    tools: list[ToolRecord] = []
    errors: list[str] = []
    grade: GradeRecord | None = None
    for span in final:
        attrs = span.attributes
        if span.kind == SpanKind.LLM and (tag is None or attrs.get("tag") == tag):
            last_call = attrs
        elif span.kind == SpanKind.TOOL:
            tools.append(
                ToolRecord(
                    name=span.name,
                    arguments=attrs.get("arguments") or {},
                    result=attrs.get("result"),
                    error=attrs.get("error"),
                )
            )
        elif span.kind == SpanKind.EXCEPTION:
            errors.append(f"{attrs.get('type', 'Exception')}: {attrs.get('message', '')}")
        elif span.kind == SpanKind.LOG and span.name == GRADE_SPAN:
            grade = GradeRecord(
                choice=attrs.get("choice"), expected=attrs.get("expected"), correct=attrs.get("correct")
            )
    return Transcript(
        rollout_id=rollout.rollout_id,
        task_id=rollout.task.id,
        messages=list(last_call.get("messages") or []) if last_call else [],
        output_text=last_call.get("text") if last_call else None,
        output_tool_calls=list(last_call.get("tool_calls") or []) if last_call else [],
        tools=tools,
        errors=errors + ([f"rollout error: {rollout.error}"] if rollout.error else []),
        reward=rollout.reward,
        grade=grade,
    )


def _fmt(value: Any) -> str:
    return "none" if value is None else str(value)


def _content_text(content: Any) -> str:
    """Message content as text: a string as is, OpenAI content parts joined by their text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return str(content)


def _render_tool_call(call: dict[str, Any]) -> str:
    """``name(arguments)`` for an OpenAI-style call (``{"function": {"name", "arguments"}}``) or a flat
    ``{"name", "arguments"}`` one; anything else as JSON."""
    fn = call.get("function", call)
    if "name" not in fn:
        return json.dumps(call, default=str)
    args = fn.get("arguments", "")
    if not isinstance(args, str):
        args = json.dumps(args, default=str)
    return f"{fn['name']}({args})"


def _render_message(message: dict[str, Any]) -> str:
    role = message.get("role", "?")
    if role == "tool" and message.get("name"):
        role = f"tool {message['name']}"
    lines = [f"[{role}]"]
    text = _content_text(message.get("content"))
    if text:
        lines.append(text)
    lines += [f"tool call: {_render_tool_call(c)}" for c in message.get("tool_calls") or []]
    return "\n".join(lines)


def _render_tool(tool: ToolRecord) -> str:
    outcome = f"error: {tool.error}" if tool.error else f"-> {json.dumps(tool.result, default=str)}"
    return f"{tool.name}({json.dumps(tool.arguments, default=str)}) {outcome}"


def _elide_middle(text: str, budget: int) -> str:
    """``text`` cut to ``budget`` characters by removing its middle (keeping 60 % of the budget at the start,
    where the instructions are, the rest at the end, where the answer is)."""
    if len(text) <= budget:
        return text
    marker = "\n[... {} characters left out ...]\n"
    room = budget - len(marker.format(len(text)))
    if room <= 0:
        return text[:budget]
    head = room * 3 // 5
    tail = room - head
    return text[:head] + marker.format(len(text) - room) + text[len(text) - tail :]

"""The OpenAI chat-completions request, validated with pydantic.

Unknown fields are ignored (agents send whatever their OpenAI client version sends: ``user``, ``metadata``,
``presence_penalty`` ...), known fields are checked, and a failure names the field so the agent's author sees
``messages.2.role`` rather than a stack trace. ``continue_final_message`` is vLLM's extension (the openai client
passes it through ``extra_body``); ``rltrain_tag`` labels the recorded span.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Role = Literal["system", "developer", "user", "assistant", "tool"]


@dataclass(frozen=True)
class MessageKey:
    """What identifies a message for prefix reuse: role, text and tool calls (name + canonical arguments).

    Ids, ``name`` and ``None``-versus-empty content are left out, so a message the agent sends back (often
    re-serialised by its client) equals the one the gateway returned whenever it says the same thing.
    """

    role: str
    text: str
    calls: tuple[tuple[str, str], ...] = ()


class _OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ContentPart(_OpenAIModel):
    type: str
    text: str | None = None


class FunctionCall(_OpenAIModel):
    name: str
    #: OpenAI sends a JSON string; hand-built histories often hold the object itself
    arguments: str | dict[str, Any] = "{}"

    def arguments_object(self) -> dict[str, Any] | str:
        """The arguments as an object, or the original string when it is not a JSON object."""
        if isinstance(self.arguments, dict):
            return self.arguments
        try:
            value = json.loads(self.arguments)
        except json.JSONDecodeError:
            return self.arguments
        return value if isinstance(value, dict) else self.arguments


class MessageToolCall(_OpenAIModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_OpenAIModel):
    role: Role
    content: str | list[ContentPart] | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _text_only(self) -> ChatMessage:
        if isinstance(self.content, list):
            kinds = sorted({part.type for part in self.content if part.type != "text" or part.text is None})
            if kinds:
                raise ValueError(f"only text content parts are supported, got part type(s) {kinds}")
        return self

    @property
    def template_role(self) -> str:
        """``developer`` is OpenAI's newer name for ``system``; chat templates only know ``system``."""
        return "system" if self.role == "developer" else self.role

    def text(self) -> str:
        """The content as one string (text parts joined, ``None`` as empty)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content)

    def key(self) -> MessageKey:
        calls = tuple(
            (call.function.name, _canonical_json(call.function.arguments_object()))
            for call in self.tool_calls or ()
        )
        return MessageKey(role=self.template_role, text=self.text(), calls=calls)


def _canonical_json(value: dict[str, Any] | str) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=False)


class FunctionSpec(_OpenAIModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolSpec(_OpenAIModel):
    type: Literal["function"] = "function"
    function: FunctionSpec


class NamedFunction(_OpenAIModel):
    name: str


class NamedToolChoice(_OpenAIModel):
    type: Literal["function"] = "function"
    function: NamedFunction


class StreamOptions(_OpenAIModel):
    include_usage: bool = False


class ChatCompletionRequest(_OpenAIModel):
    """The fields rltrain honours; the others of the OpenAI API are accepted and ignored.

    ``tool_choice``: ``"none"`` hides the tools from the model and skips parsing; ``"auto"``, ``"required"`` and
    a named function are accepted but not enforced (there is no constrained decoding), so the completion is
    parsed as for ``"auto"`` and a missing call shows up as plain content in the span.

    ``rltrain_completion`` (rltrain's extension) is the assistant's reply given instead of sampled: a teacher's
    demonstration. The gateway templates the prompt as for any request, tokenises the reply as the assistant's
    tokens followed by the end-of-turn token, parses it like a sampled reply and records it (flagged ``teacher``),
    without calling the engine; ``n`` must be 1, and the sampling fields and ``max_tokens`` do not apply.
    """

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ToolSpec] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    n: int = Field(default=1, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    continue_final_message: bool = False
    rltrain_tag: str | None = None
    rltrain_completion: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.rltrain_completion is not None and self.n != 1:
            raise ValueError(f"rltrain_completion gives exactly one reply, so n must be 1, got n={self.n}")
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise ValueError(
                f"continue_final_message needs the last message to be an assistant message, "
                f"got role {self.messages[-1].role!r}"
            )
        names = [tool.function.name for tool in self.tools or ()]
        if self.tool_choice not in (None, "none", "auto") and not names:
            raise ValueError("tool_choice other than 'none'/'auto' needs tools")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise ValueError(
                f"tool_choice names {self.tool_choice.function.name!r}, which is not in tools {names}"
            )
        return self

    @property
    def active_tools(self) -> list[ToolSpec] | None:
        """The tools offered to the model: none when ``tool_choice`` is ``"none"`` or no tools are given."""
        if not self.tools or self.tool_choice == "none":
            return None
        return self.tools

    @property
    def completion_limit(self) -> int | None:
        """``max_completion_tokens`` (the newer name) or ``max_tokens``; ``None`` = the gateway's default (``DEFAULT_MAX_TOKENS``, within the context)."""
        return self.max_completion_tokens or self.max_tokens

    @property
    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or ())
        return [stop for stop in stops if stop]

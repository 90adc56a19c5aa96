"""Rendering a conversation to prompt text with the model's own chat template (design decisions 1 and 2).

The gateway renders and tokenises itself so that it knows the exact tokens the model sees. Tools are handled
in one of two modes, chosen once per tokenizer by rendering probe conversations:

* **native**: the template renders tool definitions, assistant ``tool_calls`` as Hermes
  ``<tool_call>`` blocks and ``tool`` messages (Qwen2.5's does). Messages go to the template as they are
  (tool-call arguments as objects, as Hugging Face templates expect).
* **fallback**, for templates that know nothing of tools (SmolLM2's renders only ``role`` + ``content``, drops
  ``tools`` silently and fails on an assistant turn without content). The gateway writes the tools into the
  text itself, in the same Hermes format the parser reads back:

  - the system message (one is created when absent) gets :data:`FALLBACK_TOOLS_PROMPT` appended, listing
    every tool's JSON schema inside ``<tools></tools>`` and asking for ``<tool_call>{json}</tool_call>``;
  - an assistant turn with tool calls becomes its content followed by one ``<tool_call>`` block per call;
  - a tool result becomes a ``tool`` turn (``user`` when the template rejects unknown roles) whose content is
    ``<tool_response>\\n{content}\\n</tool_response>``.

In both modes an assistant message that this gateway generated earlier in the rollout is rendered from its
raw completion text (``raw_assistant``), so the rendering reproduces the tokens the model actually sampled.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from rltrain.gateway.schemas import ChatMessage, ToolSpec
from rltrain.gateway.tool_calls import TOOL_CALL_OPEN, format_tool_call

logger = logging.getLogger(__name__)

FALLBACK_TOOLS_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""

_PROBE_TOOL = "rltrain_probe_tool"
_PROBE_RESULT = "rltrain_probe_result"
_PROBE_TEXT = "rltrain_probe_text"


class ChatFormatError(ValueError):
    """The model's chat template cannot render the conversation (a request error, not a gateway bug)."""


class ChatFormat:
    """Render and tokenise conversations for one tokenizer.

    Attributes fixed at construction: ``native_tools`` (the template renders tools itself), ``tool_role``
    (the role tool results are rendered with in fallback mode), ``turn_closing`` (the text the template puts
    after an assistant message's content) and ``end_of_turn_ids`` (token ids that end an assistant turn).
    """

    def __init__(self, tokenizer: Any, *, tokenize_cache_size: int = 256) -> None:
        self.tokenizer = tokenizer
        # Rollouts of one task (a GRPO group, every epoch) open with the same prompt, and tokenising it was
        # half the gateway's own time per call. Per instance, so the cache dies with its tokenizer; lru_cache
        # is thread-safe.
        self._encode = functools.lru_cache(maxsize=tokenize_cache_size)(self._encode_uncached)
        self.native_tools = self._renders_tools_natively()
        self.tool_role = "tool" if self._accepts_tool_role() else "user"
        self.turn_closing = self._turn_closing()
        self.turn_closing_ids = self.tokenize(self.turn_closing)
        end_ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        if self.turn_closing_ids and self.turn_closing_ids[0] in set(tokenizer.all_special_ids):
            end_ids.add(self.turn_closing_ids[0])
        self.end_of_turn_ids = frozenset(end_ids)
        logger.info(
            "chat format: tools %s, tool results as role %r, end-of-turn ids %s",
            "native" if self.native_tools else "fallback",
            self.tool_role,
            sorted(self.end_of_turn_ids),
        )

    # -- text <-> tokens ------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        """Token ids of rendered text; the template already wrote any BOS, so none is added.

        Repeated texts come from a bounded cache (a fresh list each time: callers may extend it)."""
        return list(self._encode(text))

    def _encode_uncached(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool) -> str:
        return self.tokenizer.decode(
            list(ids), skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
        )

    # -- rendering ------------------------------------------------------------------------------------
    def render(
        self,
        messages: Sequence[ChatMessage],
        tools: Sequence[ToolSpec] | None = None,
        *,
        raw_assistant: Mapping[int, str] | None = None,
        continue_final_message: bool = False,
    ) -> str:
        """The prompt text: with a generation prompt, or, with ``continue_final_message``, ending inside the
        final (assistant) message so that the model continues it.

        ``raw_assistant`` maps message indices to the raw text the gateway generated for them.
        """
        raw = raw_assistant or {}
        turns = [
            {"role": "assistant", "content": raw[i]} if i in raw else self._turn(message)
            for i, message in enumerate(messages)
        ]
        tool_dicts = [tool.model_dump(exclude_none=True) for tool in tools or ()]
        if tool_dicts and not self.native_tools:
            turns = _with_tools_in_system(turns, tool_dicts)
        try:
            return self._apply(
                turns,
                tools=tool_dicts if self.native_tools and tool_dicts else None,
                add_generation_prompt=not continue_final_message,
                continue_final_message=continue_final_message,
            )
        except Exception as exc:  # jinja2 errors, raise_exception() in templates, HF's own ValueErrors
            raise ChatFormatError(f"the model's chat template cannot render these messages: {exc}") from exc

    def _turn(self, message: ChatMessage) -> dict[str, Any]:
        """One message as the template (native) or the fallback format wants it."""
        role, text = message.template_role, message.text()
        if message.role == "assistant" and message.tool_calls:
            if self.native_tools:
                calls = [
                    {
                        "type": "function",
                        "function": {"name": c.function.name, "arguments": c.function.arguments_object()},
                    }
                    for c in message.tool_calls
                ]
                return {"role": role, "content": text, "tool_calls": calls}
            blocks = [
                format_tool_call(c.function.name, c.function.arguments_object()) for c in message.tool_calls
            ]
            return {"role": role, "content": "\n".join(([text] if text else []) + blocks)}
        if message.role == "tool" and not self.native_tools:
            return {"role": self.tool_role, "content": f"<tool_response>\n{text}\n</tool_response>"}
        turn: dict[str, Any] = {"role": role, "content": text}
        if message.role == "tool" and message.tool_call_id is not None:
            turn["tool_call_id"] = message.tool_call_id
        return turn

    def _apply(self, turns: list[dict[str, Any]], **kwargs: Any) -> str:
        return self.tokenizer.apply_chat_template(turns, tokenize=False, **kwargs)

    # -- probes: what does this template do? ----------------------------------------------------------
    def _renders_tools_natively(self) -> bool:
        """True when the template renders tool schemas, Hermes ``<tool_call>`` blocks and tool results."""
        tool = {
            "type": "function",
            "function": {"name": _PROBE_TOOL, "description": "probe", "parameters": {}},
        }
        call = {"type": "function", "function": {"name": _PROBE_TOOL, "arguments": {"x": 1}}}
        conversation = [
            {"role": "user", "content": _PROBE_TEXT},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": _PROBE_RESULT},
        ]
        try:
            with_tools = self._apply(conversation[:1], tools=[tool], add_generation_prompt=True)
            with_call = self._apply(conversation, tools=[tool], add_generation_prompt=True)
        except Exception as exc:  # noqa: BLE001 - a template failing on tool turns is what the fallback is for
            logger.debug("chat template fails on tool turns (%s): using the fallback tool format", exc)
            return False
        call_text = with_call.partition(_PROBE_TEXT)[2]
        return (
            _PROBE_TOOL in with_tools
            and TOOL_CALL_OPEN in call_text
            and _PROBE_TOOL in call_text
            and _PROBE_RESULT in call_text
        )

    def _accepts_tool_role(self) -> bool:
        try:
            text = self._apply(
                [
                    {"role": "user", "content": _PROBE_TEXT},
                    {"role": "assistant", "content": _PROBE_TEXT},
                    {"role": "tool", "content": _PROBE_RESULT},
                ],
                add_generation_prompt=True,
            )
        except Exception as exc:  # noqa: BLE001 - templates reject roles with any exception type
            logger.debug(
                "chat template rejects role 'tool' (%s): tool results are rendered as user turns", exc
            )
            return False
        return _PROBE_RESULT in text

    def _turn_closing(self) -> str:
        """What the template writes after the content of a final assistant message (``<|im_end|>\\n``)."""
        marker = "rltrain-end-of-content"
        text = self._apply(
            [{"role": "user", "content": _PROBE_TEXT}, {"role": "assistant", "content": marker}],
            add_generation_prompt=False,
        )
        return text[text.rindex(marker) + len(marker) :] if marker in text else ""


def _with_tools_in_system(turns: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fallback: the tools prompt appended to the system message (a new system message when there is none)."""
    block = FALLBACK_TOOLS_PROMPT.format(
        tools="\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
    )
    if turns and turns[0]["role"] == "system":
        system = turns[0]["content"]
        return [{**turns[0], "content": f"{system}\n\n{block}" if system else block}, *turns[1:]]
    return [{"role": "system", "content": block}, *turns]

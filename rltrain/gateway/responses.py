"""Served completions as OpenAI JSON: the response body and the server-sent-event stream.

Streaming streams: tokens leave as the engine samples them (:class:`LiveStream`), held back only while they may
still change (see there), so the chunks join to exactly the non-streamed content; tool calls follow as
``tool_calls`` deltas once the completion is whole, then a chunk with the finish reason.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rltrain.gateway.chat_format import ChatFormat
from rltrain.gateway.tool_calls import TOOL_CALL_OPEN, ParsedOutput

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Choice:
    """One served completion: ids and logprobs as recorded, the text and what was parsed out of it."""

    index: int
    completion_ids: list[int]
    logprobs: list[float]
    #: the sampled text (special tokens skipped, cut at a stop string)
    text: str
    parsed: ParsedOutput
    #: "stop", "length" or "tool_calls"
    finish_reason: str

    def message(self) -> dict[str, Any]:
        """The OpenAI assistant message (``tool_calls`` only when there are some)."""
        message: dict[str, Any] = {"role": "assistant", "content": self.parsed.content}
        if self.parsed.tool_calls:
            message["tool_calls"] = [call.to_openai() for call in self.parsed.tool_calls]
        return message


@dataclass(frozen=True)
class ChatResult:
    """Everything one request produced, ready to be written out as JSON or as a stream."""

    id: str
    created: int
    model: str
    prompt_tokens: int
    choices: list[Choice]

    def usage(self) -> dict[str, int]:
        completion = sum(len(choice.completion_ids) for choice in self.choices)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }


def completion_body(result: ChatResult, fmt: ChatFormat, *, logprobs: bool) -> dict[str, Any]:
    """The ``chat.completion`` object."""
    return {
        "id": result.id,
        "object": "chat.completion",
        "created": result.created,
        "model": result.model,
        "choices": [
            {
                "index": choice.index,
                "message": choice.message(),
                "logprobs": _logprobs(choice, fmt) if logprobs else None,
                "finish_reason": choice.finish_reason,
            }
            for choice in result.choices
        ],
        "usage": result.usage(),
    }


class LiveStream:
    """The ``chat.completion.chunk`` stream of one request, as SSE lines, built while the engine samples.

    :meth:`token` takes each token as it is sampled and returns the chunk carrying the text that became final
    with it, if any; :meth:`finish` takes the served result and returns the rest: each choice's remaining text,
    its tool calls as ``tool_calls`` deltas, its finish reason, the usage, ``[DONE]``. Text is held back while it
    may still change: an incomplete multi-byte character, anything from where a stop string or (with tools) a
    ``<tool_call>`` block may begin, and (with tools) whitespace the tool-call parser may strip. So the chunks
    join to exactly the non-streamed content. An engine that reports no tokens early gives one text chunk per
    choice, at the end.
    """

    def __init__(
        self, fmt: ChatFormat, *, request_id: str, created: int, model: str, n: int, stops: Sequence[str],
        tools: bool, logprobs: bool,
    ) -> None:
        self.fmt = fmt
        self.head = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model}
        self.markers = [*stops, TOOL_CALL_OPEN] if tools else list(stops)
        self.tools = tools
        self.logprobs = logprobs
        self._ids: list[list[int]] = [[] for _ in range(n)]
        self._entries: list[list[dict[str, Any]]] = [[] for _ in range(n)]
        self._emitted = [""] * n
        self._attributed = [0] * n

    def start(self) -> list[str]:
        """The opening chunk of every choice (its role)."""
        return [self._event(index, {"role": "assistant", "content": ""}) for index in range(len(self._ids))]

    def token(self, index: int, token: int, logprob: float) -> str | None:
        ids = self._ids[index]
        ids.append(token)
        if self.logprobs and token not in self.fmt.end_of_turn_ids:
            self._entries[index].append(_token_logprob(self.fmt, token, logprob))
        text = self.fmt.decode(ids, skip_special_tokens=True)
        safe = self._safe(text)
        emitted = self._emitted[index]
        if len(safe) <= len(emitted) or not safe.startswith(emitted):
            return None
        self._emitted[index] = safe
        # logprob entries go with the text once it all became final; held-back tokens go with a later piece
        entries: list[dict[str, Any]] = []
        if safe == text:
            entries = self._entries[index][self._attributed[index]:]
            self._attributed[index] = len(self._entries[index])
        return self._event(index, {"content": safe[len(emitted):]}, logprobs=entries)

    def _safe(self, text: str) -> str:
        """The part of ``text`` that no later token, stop string or tool-call parse can change."""
        end = len(text.rstrip("\ufffd"))
        for marker in self.markers:
            found = text.find(marker)
            if found < 0:  # a suffix that could be the start of the marker
                found = next((len(text) - k for k in range(min(len(marker) - 1, len(text)), 0, -1)
                              if text.endswith(marker[:k])), -1)
            if found >= 0:
                end = min(end, found)
        if self.tools:
            if text[:1].isspace():  # the parser strips it when a call follows, keeps it when none does
                return ""
            return text[:end].rstrip()
        return text[:end]

    def finish(self, result: ChatResult, *, include_usage: bool) -> list[str]:
        events = []
        for choice in result.choices:
            content = choice.parsed.content or ""
            emitted = self._emitted[choice.index]
            if not content.startswith(emitted):  # a decoder whose prefixes are not prefixes of the whole text
                logger.warning("stream of choice %d diverged from its final text; the rest is not streamed",
                               choice.index)
                emitted = content
            entries = _logprobs(choice, self.fmt)["content"][self._attributed[choice.index]:] if self.logprobs else []
            if len(content) > len(emitted) or entries:
                events.append(self._event(choice.index, {"content": content[len(emitted):]}, logprobs=entries))
            for position, call in enumerate(choice.parsed.tool_calls):
                events.append(self._event(choice.index, {"tool_calls": [{"index": position, **call.to_openai()}]}))
            events.append(self._event(choice.index, {}, finish_reason=choice.finish_reason))
        if include_usage:
            events.append(_data({**self.head, "choices": [], "usage": result.usage()}))
        events.append("data: [DONE]\n\n")
        return events

    def error(self, error: dict[str, Any]) -> list[str]:
        """What a stream whose generation failed after its first chunk ends with: the error body, ``[DONE]``."""
        return [_data(error), "data: [DONE]\n\n"]

    def _event(
        self, index: int, delta: dict[str, Any], *, finish_reason: str | None = None,
        logprobs: Sequence[dict[str, Any]] = (),
    ) -> str:
        choice: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": finish_reason}
        if self.logprobs and "content" in delta:
            choice["logprobs"] = {"content": list(logprobs)}
        return _data({**self.head, "choices": [choice]})


def _logprobs(choice: Choice, fmt: ChatFormat) -> dict[str, Any]:
    """OpenAI ``logprobs``: one entry per sampled token (the closing end-of-turn token left out). The engine
    returns only the sampled token's logprob, so ``top_logprobs`` lists are empty."""
    ids = choice.completion_ids
    if ids and ids[-1] in fmt.end_of_turn_ids:
        ids = ids[:-1]
    return {
        "content": [_token_logprob(fmt, token, lp) for token, lp in zip(ids, choice.logprobs, strict=False)]
    }


def _token_logprob(fmt: ChatFormat, token: int, logprob: float) -> dict[str, Any]:
    text = fmt.decode([token], skip_special_tokens=False)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8")), "top_logprobs": []}


def _data(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

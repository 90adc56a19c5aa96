"""Served completions as OpenAI JSON: the response body and the server-sent-event stream.

Streaming is "generate, then stream": the engine returns whole completions, and the stream replays each one in
token-sized pieces (pieces that end inside a multi-byte character are held back, so every chunk is valid text
and the chunks join to exactly the non-streamed content), then its tool calls as ``tool_calls`` deltas, then a
chunk with the finish reason. Agents written against the streaming API work unchanged; they just see the first
token later.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from rltrain.gateway.chat_format import ChatFormat
from rltrain.gateway.tool_calls import ParsedOutput


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


def stream_events(
    result: ChatResult, fmt: ChatFormat, *, logprobs: bool, include_usage: bool
) -> Iterator[str]:
    """The ``chat.completion.chunk`` stream as SSE lines, ending with ``data: [DONE]``."""
    for choice in result.choices:
        yield _event(result, choice.index, {"role": "assistant", "content": ""})
        token_logprobs = _logprobs(choice, fmt)["content"] if logprobs else None
        for piece, tokens in _pieces(choice, fmt, token_logprobs):
            yield _event(result, choice.index, {"content": piece}, logprobs=tokens, with_logprobs=logprobs)
        for position, call in enumerate(choice.parsed.tool_calls):
            yield _event(result, choice.index, {"tool_calls": [{"index": position, **call.to_openai()}]})
        yield _event(result, choice.index, {}, finish_reason=choice.finish_reason)
    if include_usage:
        yield _data({**_chunk_head(result), "choices": [], "usage": result.usage()})
    yield "data: [DONE]\n\n"


def _pieces(
    choice: Choice, fmt: ChatFormat, token_logprobs: list[dict[str, Any]] | None
) -> Iterator[tuple[str, list[dict[str, Any]] | None]]:
    """The content in token-sized pieces that join to exactly ``choice.parsed.content``, each with the
    logprob entries of the tokens it covers (the last piece also takes any tokens left over)."""
    content = choice.parsed.content or ""
    emitted = 0
    taken = 0
    for count in range(1, len(choice.completion_ids) + 1):
        decoded = fmt.decode(choice.completion_ids[:count], skip_special_tokens=True)
        if decoded.endswith("\ufffd") or len(decoded) <= emitted or not content.startswith(decoded):
            continue
        yield decoded[emitted:], token_logprobs[taken:count] if token_logprobs is not None else None
        emitted, taken = len(decoded), count
    if emitted < len(content):
        yield content[emitted:], token_logprobs[taken:] if token_logprobs is not None else None


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


def _chunk_head(result: ChatResult) -> dict[str, Any]:
    return {
        "id": result.id,
        "object": "chat.completion.chunk",
        "created": result.created,
        "model": result.model,
    }


def _event(
    result: ChatResult,
    index: int,
    delta: dict[str, Any],
    *,
    finish_reason: str | None = None,
    logprobs: Sequence[dict[str, Any]] | None = None,
    with_logprobs: bool = False,
) -> str:
    choice: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": finish_reason}
    if with_logprobs:
        choice["logprobs"] = {"content": list(logprobs or ())}
    return _data({**_chunk_head(result), "choices": [choice]})


def _data(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

"""Serving one chat completion, independent of HTTP: the gateway's core.

``request -> model check -> rollout attribution -> prompt ids (session prefix reuse) -> context check ->
engine -> per choice: stop strings, tool-call parsing -> session memory -> llm spans``. The FastAPI app in
:mod:`rltrain.gateway.app` only parses bodies, checks the key and writes the result out.

A request carrying ``rltrain_completion`` (a teacher's demonstration) takes the same path with the engine step
replaced: the given reply is tokenised as if it had been sampled, so a demonstration becomes the same
token-level record as any rollout, prefix reuse across its turns included.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from bisect import bisect_left
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from rltrain.engines.base import (
    Completion,
    ContextLengthError,
    Engine,
    EngineError,
    GenerationRequest,
    OnToken,
    generate,
)
from rltrain.gateway.chat_format import ChatFormat, ChatFormatError
from rltrain.gateway.errors import (
    ConflictError,
    ContextLengthExceededError,
    EngineUnavailableError,
    InvalidRequestError,
    NotFoundError,
)
from rltrain.gateway.responses import ChatResult, Choice
from rltrain.gateway.schemas import ChatCompletionRequest, ChatMessage
from rltrain.gateway.sessions import PromptPlan, SessionKey, SessionStore
from rltrain.gateway.tool_calls import ParsedOutput, parse_tool_calls
from rltrain.store.base import Store, UnknownRolloutError
from rltrain.store.memory import MemoryStore
from rltrain.types import LLMCallRecord, Rollout, RolloutStatus, Span, SpanKind

#: model names of the form ``policy-v{N}`` address the policy after weight sync N (design decision 4)
POLICY_ALIAS = re.compile(r"^policy-v(\d+)$")
#: the completion budget of a request that names none (``max_tokens`` / ``max_completion_tokens``), within what
#: the context leaves: a forgotten limit must not hold the engine for the rest of an 8k context
DEFAULT_MAX_TOKENS = 1024

_T = TypeVar("_T")


class ChatService:
    """Chat completions over one engine, recorded as llm spans in ``store`` when attributed to a rollout.

    ``max_n`` caps completions per request; ``served_models`` are extra names accepted for the engine's
    model besides ``engine.model_name`` and ``policy-v{N}``.
    """

    def __init__(
        self, engine: Engine, store: Store | None, *, max_n: int = 16, served_models: Sequence[str] = ()
    ) -> None:
        if max_n < 1:
            raise ValueError(f"max_n must be >= 1, got {max_n}")
        self.engine = engine
        self.store = store
        self.max_n = max_n
        self.served_models = tuple(served_models)
        self.chat_format = ChatFormat(engine.tokenizer)
        self.sessions = SessionStore(self.chat_format)
        self._turn_end_id = _turn_end_id(self.chat_format, engine.tokenizer)

    # -- models and rollouts --------------------------------------------------------------------------
    def model_names(self) -> list[str]:
        """What ``/v1/models`` lists: the engine's name, the extra names, the current policy alias."""
        names = [self.engine.model_name, *self.served_models, f"policy-v{self.engine.policy_version}"]
        return list(dict.fromkeys(names))

    def check_model(self, name: str) -> None:
        if name in (self.engine.model_name, *self.served_models) or POLICY_ALIAS.match(name):
            return
        raise NotFoundError(
            f"model {name!r} does not exist here; this gateway serves {self.model_names()} (or any policy-v<N>)",
            param="model",
            code="model_not_found",
        )

    async def attempt_of(self, rollout_id: str, attempt_no: int | None = None) -> int:
        """The running attempt of ``rollout_id`` that a call is attributed to: 404 for an unknown rollout, 409
        when it is not running or (``attempt_no`` given) when its running attempt is another one."""
        if self.store is None:
            raise NotFoundError(
                f"rollout {rollout_id!r} not found: this gateway has no store", code="rollout_not_found"
            )
        try:
            rollout = self.store.get_rollout_nowait(rollout_id) or await _call_store(
                self.store, self.store.get_rollout, rollout_id
            )
        except UnknownRolloutError:
            raise NotFoundError(f"rollout {rollout_id!r} not found", code="rollout_not_found") from None
        if rollout.status.finished:  # the runner releases a finished rollout's session; this catches stragglers
            self.sessions.drop(rollout_id)
        _check_running(rollout, attempt_no)
        return rollout.attempt_count

    def release_rollout(self, rollout_id: str) -> None:
        """Forget the rollout's session (call when it finishes; the session is also dropped lazily)."""
        self.sessions.drop(rollout_id)

    # -- the completion -------------------------------------------------------------------------------
    async def complete(
        self,
        request: ChatCompletionRequest,
        *,
        rollout_id: str | None = None,
        attempt_no: int | None = None,
        tag: str | None = None,
        on_token: OnToken | None = None,
    ) -> ChatResult:
        """Serve ``request``; with ``rollout_id`` (and, when given, only while its attempt ``attempt_no`` runs),
        remember the turn and record one llm span per choice. ``on_token`` sees each token as it is sampled (for
        streaming; engines that cannot report tokens early report none)."""
        started = time.time()
        self.check_model(request.model)
        if request.n > self.max_n:
            raise InvalidRequestError(
                f"n must be <= {self.max_n} on this gateway, got {request.n}", param="n"
            )
        key = (
            SessionKey(rollout_id, await self.attempt_of(rollout_id, attempt_no))
            if rollout_id is not None
            else None
        )
        try:
            plan = self.sessions.plan(
                key,
                request.messages,
                request.active_tools,
                continue_final_message=request.continue_final_message,
            )
        except ChatFormatError as exc:
            raise InvalidRequestError(str(exc), param="messages") from exc
        if request.rltrain_completion is not None:
            completions = [self._given_completion(request.rltrain_completion, len(plan.prompt_ids))]
            policy_version = self.engine.policy_version
        else:
            completions, policy_version = await self._generate(request, plan, on_token, rollout_id)
        choices = [self._choice(index, completion, request) for index, completion in enumerate(completions)]
        result = ChatResult(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            created=int(started),
            model=request.model,
            prompt_tokens=len(plan.prompt_ids),
            choices=choices,
        )
        if key is not None and self.store is not None:
            await self._remember(self.store, key, request, plan, result, policy_version, tag, started)
        return result

    async def _generate(
        self, request: ChatCompletionRequest, plan: PromptPlan, on_token: OnToken | None, rollout_id: str | None
    ) -> tuple[list[Completion], int]:
        """Sample the request's completions (the rollout is the engine's session: several engines keep its turns
        on one); returns them and the policy version that sampled them."""
        generation = GenerationRequest(
            prompt_ids=plan.prompt_ids,
            max_tokens=self._max_tokens(request, len(plan.prompt_ids)),
            temperature=request.temperature,
            top_p=request.top_p,
            n=request.n,
            seed=request.seed,
            stop_token_ids=tuple(sorted(self.chat_format.end_of_turn_ids)),
            adapter=request.model if POLICY_ALIAS.match(request.model) else None,
            session=rollout_id,
        )
        try:
            generated = await generate(self.engine, generation, on_token)
        except ContextLengthError as exc:
            raise ContextLengthExceededError(str(exc)) from exc
        except EngineError as exc:
            if isinstance(exc, ValueError):  # the engine's own request validation
                raise InvalidRequestError(f"the engine refused the request: {exc}") from exc
            raise EngineUnavailableError(f"the engine failed to generate: {exc}") from exc
        return generated.completions, generated.policy_version

    def _given_completion(self, text: str, prompt_tokens: int) -> Completion:
        """A teacher's reply as if it had been sampled: its tokens, then the end-of-turn token a sampled reply
        stops on (so the row teaches the model to stop there). Logprobs are 0.0: nothing was sampled."""
        if self._turn_end_id is None:
            raise InvalidRequestError(
                "rltrain_completion needs an end-of-turn token, but this model's tokenizer has no EOS token and its "
                "chat template closes a turn with no special token",
                param="rltrain_completion",
            )
        ids = [*self.chat_format.tokenize(text), self._turn_end_id]
        context = self.engine.max_context
        if prompt_tokens + len(ids) > context:
            raise ContextLengthExceededError(
                f"this model's maximum context length is {context} tokens, but the messages take {prompt_tokens} "
                f"tokens and rltrain_completion {len(ids)}; shorten them",
                param="rltrain_completion",
            )
        return Completion(completion_ids=ids, logprobs=[0.0] * len(ids), finish_reason="stop")

    def _max_tokens(self, request: ChatCompletionRequest, prompt_tokens: int) -> int:
        """The completion budget: as asked, or :data:`DEFAULT_MAX_TOKENS` within what is left of the context;
        refused when it cannot fit."""
        context = self.engine.max_context
        room = context - prompt_tokens
        asked = request.completion_limit
        if room < 1:
            raise ContextLengthExceededError(
                f"this model's maximum context length is {context} tokens, but the messages take {prompt_tokens} "
                "tokens, leaving no room for a completion; shorten the messages"
            )
        if asked is not None and asked > room:
            raise ContextLengthExceededError(
                f"this model's maximum context length is {context} tokens, but you requested {prompt_tokens + asked} "
                f"tokens ({prompt_tokens} in the messages, {asked} in the completion); reduce the messages or "
                "max_tokens",
                param="max_tokens",
            )
        return asked if asked is not None else min(room, DEFAULT_MAX_TOKENS)

    def _choice(self, index: int, completion: Completion, request: ChatCompletionRequest) -> Choice:
        """One completion as served: cut at the first stop string, tool calls parsed when tools are active."""
        ids, logprobs = list(completion.completion_ids), list(completion.logprobs)
        finish_reason: str = completion.finish_reason
        text = self.chat_format.decode(ids, skip_special_tokens=True)
        cut = _first_stop(text, request.stop_strings)
        if cut is not None:
            start, end = cut
            # Keep the tokens up to the one that completed the stop string: what a stopping engine samples.
            kept = bisect_left(
                range(len(ids) + 1),
                end,
                key=lambda n: len(self.chat_format.decode(ids[:n], skip_special_tokens=True)),
            )
            ids, logprobs, text, finish_reason = ids[:kept], logprobs[:kept], text[:start], "stop"
        tools = request.active_tools
        if tools:
            parsed = parse_tool_calls(text, allowed_names={tool.function.name for tool in tools})
        else:
            parsed = ParsedOutput(content=text, tool_calls=[])
        if parsed.tool_calls:
            finish_reason = "tool_calls"
        return Choice(
            index=index,
            completion_ids=ids,
            logprobs=logprobs,
            text=text,
            parsed=parsed,
            finish_reason=finish_reason,
        )

    async def _remember(
        self,
        store: Store,
        key: SessionKey,
        request: ChatCompletionRequest,
        plan: PromptPlan,
        result: ChatResult,
        policy_version: int,
        tag: str | None,
        started: float,
    ) -> None:
        """Keep each choice as a session turn and record it as an llm span, unless the attempt ended while the
        engine generated (it timed out, say): then nothing is recorded and the call gets a 409."""
        ended = time.time()
        messages = [message.model_dump(mode="json", exclude_none=True) for message in request.messages]
        tools = (
            [tool.model_dump(mode="json", exclude_none=True) for tool in request.tools]
            if request.tools
            else None
        )
        spans = []
        for choice in result.choices:
            completion_tokens = len(choice.completion_ids)
            record = LLMCallRecord(
                model=request.model,
                messages=messages,
                tools=tools,
                prompt_ids=plan.prompt_ids,
                completion_ids=choice.completion_ids,
                logprobs=choice.logprobs,
                text=choice.text,
                tool_calls=[call.to_openai() for call in choice.parsed.tool_calls] or None,
                tool_call_error=choice.parsed.error,
                finish_reason=choice.finish_reason,
                usage={
                    "prompt_tokens": result.prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": result.prompt_tokens + completion_tokens,
                },
                policy_version=policy_version,
                prefix_reused=plan.prefix_reused,
                fork_cause=plan.fork_cause,
                tag=tag,
                latency_s=ended - started,
                choice_index=choice.index,
                teacher=request.rltrain_completion is not None,
            )
            spans.append(
                Span(
                    rollout_id=key.rollout_id,
                    attempt_no=key.attempt_no,
                    kind=SpanKind.LLM,
                    name="chat.completions",
                    start_time=started,
                    end_time=ended,
                    attributes=record.model_dump(mode="json"),
                )
            )
        # Taken at once when the store can (the attempt runs, no disk write on this path); else checked and
        # written in a worker thread.
        ended_as = (
            None
            if store.add_spans_nowait(spans)
            else await _call_store(store, _add_spans_if_running, store, key, spans)
        )
        if ended_as is not None:  # remembered nowhere: the attempt's session is not touched either
            raise ConflictError(
                f"attempt {key.attempt_no} of rollout {key.rollout_id!r} ended while this call was served "
                f"(the rollout is now {ended_as}); the completion was not recorded",
                code="attempt_ended",
            )
        for choice in result.choices:
            reply = ChatMessage.model_validate(choice.message()).key()
            self.sessions.record(
                key,
                request.messages,
                plan,
                choice.completion_ids,
                reply,
                continue_final_message=request.continue_final_message,
            )


def _check_running(rollout: Rollout, attempt_no: int | None) -> None:
    """Refuse (409) a call to a rollout that is not running, or whose running attempt is not ``attempt_no``."""
    if rollout.status.finished:
        raise ConflictError(
            f"rollout already finished: rollout {rollout.rollout_id!r} is {rollout.status.value}",
            code="rollout_finished",
        )
    if rollout.status != RolloutStatus.RUNNING:
        raise ConflictError(
            f"rollout {rollout.rollout_id!r} is {rollout.status.value}, not running; calls are accepted only "
            "while an attempt runs",
            code="rollout_not_running",
        )
    if attempt_no is not None and attempt_no != rollout.attempt_count:
        raise ConflictError(
            f"attempt {attempt_no} of rollout {rollout.rollout_id!r} has ended (attempt {rollout.attempt_count} "
            "runs now); calls are accepted only from the running attempt",
            code="attempt_ended",
        )


def _add_spans_if_running(store: Store, key: SessionKey, spans: list[Span]) -> str | None:
    """Record ``spans`` if ``key``'s attempt still runs; otherwise record nothing and say what the rollout is
    now. (A finish landing between the check and the write is not excluded; the window is one store call.)"""
    rollout = store.get_rollout(key.rollout_id)
    if rollout.status != RolloutStatus.RUNNING or rollout.attempt_count != key.attempt_no:
        return f"{rollout.status.value} at attempt {rollout.attempt_count}"
    store.add_spans(spans)
    return None


async def _call_store(store: Store, method: Callable[..., _T], *args: Any) -> _T:
    """Call a store method without blocking the event loop.

    A :class:`MemoryStore` answers in microseconds under a briefly held lock, so it is called inline: a hop to
    a worker thread and back would cost more than the call. Any other store (SQLite: file I/O) runs in a
    worker thread.
    """
    if isinstance(store, MemoryStore):
        return method(*args)
    return await asyncio.to_thread(method, *args)


def _turn_end_id(fmt: ChatFormat, tokenizer: Any) -> int | None:
    """The token a sampled reply ends on: the template's turn-closing token when it is an end-of-turn token
    (``<|im_end|>``), else the tokenizer's EOS; ``None`` when there is neither."""
    closing = fmt.turn_closing_ids
    if closing and closing[0] in fmt.end_of_turn_ids:
        return closing[0]
    return tokenizer.eos_token_id


def _first_stop(text: str, stops: Sequence[str]) -> tuple[int, int] | None:
    """Start and end of the earliest stop string in ``text``, or ``None``."""
    found = [(position, position + len(stop)) for stop in stops if (position := text.find(stop)) >= 0]
    return min(found) if found else None

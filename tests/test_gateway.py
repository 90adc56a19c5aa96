"""The gateway end to end: the stock openai client against a live GatewayServer on the tiny engine.

What is checked: completions (plain, streamed, with logprobs), llm spans whose ids decode to what was returned
and what was rendered, token-level prefix reuse across turns, tool calls, stop strings, continuing a message,
errors in OpenAI shape (and that they leave the store and other rollouts alone), the API key and the bind check.

Tool calls: the tiny random model never writes a ``<tool_call>`` block, and no weight setting of a small model
makes it write one cleanly (a model that picks the next token from the current one loops on the tokens a block
repeats, such as ``_`` in ``<tool_call>`` and ``</tool_call>``). So the tool-call tests drive the gateway with
:class:`ScriptedEngine`, an implementation of the real Engine protocol that "samples" fixed token ids. The
gateway only ever sees token ids, so its path (decode, parse, respond, record, reuse) is exactly the one a real
engine takes; everything else runs on the real TransformersEngine.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from weather_tool import WEATHER_TOOL

from rltrain.engines.base import Completion, GenerationRequest, GenerationResult
from rltrain.engines.transformers import TransformersEngine
from rltrain.gateway import ChatFormat, GatewayServer, InsecureBindError, create_app
from rltrain.gateway.completions import ChatService
from rltrain.gateway.schemas import ChatMessage, ToolSpec
from rltrain.gateway.sessions import SessionKey, SessionStore
from rltrain.store.memory import MemoryStore
from rltrain.store.sqlite import SqliteStore
from rltrain.types import LLMCallRecord, Rollout, RolloutStatus, SpanKind, Task

WEATHER_TOOLS = [WEATHER_TOOL]
#: what the scripted model "writes": compact JSON, unlike the fallback's rendering of a tool call, so reusing a
#: turn only works if the gateway renders its own earlier messages from their raw text
CALL_TEXT = '<tool_call>{"name":"get_weather","arguments":{"city":"Paris"}}</tool_call>'
QUESTION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Weather in Paris?"},
]


class ScriptedEngine:
    """The Engine protocol over fixed completions: every request gets ``text`` as its sampled tokens + EOS.

    With ``per_character`` the ids are one tokenisation per character: a valid but non-canonical token
    sequence, as real models often sample, which re-tokenising the text would not give back.
    """

    def __init__(self, tokenizer: Any, text: str, *, per_character: bool = False) -> None:
        self.model_name = "scripted"
        self.tokenizer = tokenizer
        self.max_context = 2048
        self.policy_version = 0
        pieces = list(text) if per_character else [text]
        ids = [token for piece in pieces for token in tokenizer(piece, add_special_tokens=False)["input_ids"]]
        self.completion_ids = [*ids, tokenizer.eos_token_id]
        self.requests: list[GenerationRequest] = []

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        self.requests.append(request)
        ids = self.completion_ids
        completions = [Completion(list(ids), [-0.5] * len(ids), "stop") for _ in range(request.n)]
        return GenerationResult(
            completions=completions, policy_version=self.policy_version, model=self.model_name
        )

    def close(self) -> None:
        """Nothing to stop."""


@pytest.fixture
def store() -> MemoryStore:
    """Rollouts ``ro-a`` and ``ro-b`` running (attempt 1), ``ro-done`` finished."""
    store = MemoryStore()
    store.enqueue_rollouts(
        [Rollout(rollout_id=rid, task=Task(id=rid, payload={})) for rid in ("ro-a", "ro-b", "ro-done")]
    )
    for _ in range(3):
        assert store.claim_rollout("worker") is not None
    store.finish_attempt("ro-done", 1, RolloutStatus.SUCCEEDED, reward=1.0)
    return store


@dataclass
class Live:
    """A served gateway: its URL, the engine behind it, its chat format."""

    url: str
    engine: Any
    service: ChatService

    def client(self, rollout_id: str | None = "ro-a", api_key: str = "unused") -> openai.OpenAI:
        base = f"{self.url}/rollouts/{rollout_id}/v1" if rollout_id else f"{self.url}/v1"
        return openai.OpenAI(base_url=base, api_key=api_key, max_retries=0)

    @property
    def fmt(self) -> ChatFormat:
        return self.service.chat_format


def _serve(engine: Any, store: MemoryStore | None, **options: Any) -> Iterator[Live]:
    app = create_app(engine, store, **options)
    with GatewayServer(app) as server:
        yield Live(url=server.base_url, engine=engine, service=app.state.service)


@pytest.fixture
def live(engine: TransformersEngine, store: MemoryStore) -> Iterator[Live]:
    yield from _serve(engine, store, max_n=4)


@pytest.fixture
def tool_live(engine: TransformersEngine, store: MemoryStore) -> Iterator[Live]:
    yield from _serve(ScriptedEngine(engine.tokenizer, CALL_TEXT, per_character=True), store)


def _llm_records(store: MemoryStore, rollout_id: str) -> list[LLMCallRecord]:
    spans = store.get_spans(rollout_id)
    assert all(span.kind == SpanKind.LLM and span.name == "chat.completions" for span in spans)
    return [LLMCallRecord.model_validate(span.attributes) for span in spans]


def _render(
    fmt: ChatFormat, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
) -> str:
    specs = [ToolSpec.model_validate(tool) for tool in tools] if tools else None
    return fmt.render([ChatMessage.model_validate(message) for message in messages], specs)


# -- completions ------------------------------------------------------------------------------------------
def test_completion_is_served_and_recorded(live: Live, store: MemoryStore) -> None:
    model = live.engine.model_name
    response = live.client().chat.completions.create(
        model=model,
        messages=QUESTION,
        max_tokens=6,
        temperature=0,
        logprobs=True,
        extra_headers={"X-RLTrain-Tag": "ask"},
    )
    [choice] = response.choices
    assert choice.message.role == "assistant" and choice.message.tool_calls is None

    [span] = store.get_spans("ro-a")
    assert span.attempt_no == 1 and span.end_time is not None and span.end_time >= span.start_time
    [record] = _llm_records(store, "ro-a")
    tokenizer = live.engine.tokenizer
    assert tokenizer.decode(record.completion_ids, skip_special_tokens=True) == choice.message.content
    assert tokenizer.decode(record.prompt_ids) == _render(live.fmt, QUESTION)
    assert record.text == choice.message.content
    assert record.finish_reason == choice.finish_reason
    assert len(record.logprobs) == len(record.completion_ids) <= 6
    returned = [entry.logprob for entry in choice.logprobs.content]
    assert returned == record.logprobs[: len(returned)] and len(returned) >= len(record.completion_ids) - 1
    assert response.usage.prompt_tokens == len(record.prompt_ids) == record.usage["prompt_tokens"]
    assert response.usage.completion_tokens == len(record.completion_ids)
    assert (record.tag, record.prefix_reused, record.policy_version, record.choice_index) == (
        "ask",
        False,
        0,
        0,
    )
    assert record.messages == QUESTION and record.model == model
    assert store.get_spans("ro-b") == []


def test_body_tag_wins_over_header(live: Live, store: MemoryStore) -> None:
    live.client().chat.completions.create(
        model=live.engine.model_name,
        messages=QUESTION,
        max_tokens=2,
        extra_headers={"X-RLTrain-Tag": "header"},
        extra_body={"rltrain_tag": "body"},
    )
    assert [record.tag for record in _llm_records(store, "ro-a")] == ["body"]


def test_stream_joins_to_the_non_streamed_text(live: Live, store: MemoryStore) -> None:
    client = live.client()
    request = {"model": live.engine.model_name, "messages": QUESTION, "max_tokens": 8, "temperature": 0}
    full = client.chat.completions.create(**request).choices[0]
    chunks = list(
        client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True})
    )
    pieces = [chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices]
    assert "".join(pieces) == full.message.content
    assert sum(1 for piece in pieces if piece) > 1  # really streamed in pieces
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == full.finish_reason
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(
        _llm_records(store, "ro-a")[-1].completion_ids
    )
    assert len(store.get_spans("ro-a")) == 2  # streamed calls are recorded too


def test_n_choices_are_recorded_and_the_chosen_one_is_continued(live: Live, store: MemoryStore) -> None:
    client = live.client()
    model = live.engine.model_name
    response = client.chat.completions.create(
        model=model, messages=QUESTION, n=3, temperature=1.0, seed=7, max_tokens=5
    )
    assert [choice.index for choice in response.choices] == [0, 1, 2]
    records = _llm_records(store, "ro-a")
    assert [record.choice_index for record in records] == [0, 1, 2]
    assert len({tuple(record.prompt_ids) for record in records}) == 1
    # the agent goes on with choice 2: the next prompt extends exactly choice 2's tokens
    picked = response.choices[2].message.model_dump(exclude_none=True)
    client.chat.completions.create(
        model=model,
        messages=[*QUESTION, picked, {"role": "user", "content": "Sure?"}],
        max_tokens=3,
        temperature=0,
    )
    second = _llm_records(store, "ro-a")[-1]
    first = records[2]
    assert second.prefix_reused
    assert (
        second.prompt_ids[: len(first.prompt_ids) + len(first.completion_ids)]
        == first.prompt_ids + first.completion_ids
    )


def test_second_turn_reuses_the_first_turns_ids_exactly(live: Live, store: MemoryStore) -> None:
    client = live.client()
    model = live.engine.model_name
    first_response = client.chat.completions.create(
        model=model, messages=QUESTION, max_tokens=5, temperature=0
    )
    reply = first_response.choices[0].message.model_dump(exclude_none=True)
    follow_up = [*QUESTION, reply, {"role": "user", "content": "And tomorrow?"}]
    client.chat.completions.create(model=model, messages=follow_up, max_tokens=3, temperature=0)
    first, second = _llm_records(store, "ro-a")
    reused = first.prompt_ids + first.completion_ids
    assert second.prefix_reused
    assert second.prompt_ids[: len(reused)] == reused
    # the tiny model was cut by max_tokens before an end-of-turn token, so the template's closing is added
    assert first.finish_reason == "length"
    assert second.prompt_ids[len(reused) : len(reused) + 2] == live.fmt.turn_closing_ids
    tail = live.engine.tokenizer.decode(second.prompt_ids[len(reused) :])
    assert tail.endswith("<|im_start|>user\nAnd tomorrow?<|im_end|>\n<|im_start|>assistant\n")

    # an agent that rewrites its history gets a fresh tokenisation, and is served all the same
    rewritten = [QUESTION[0], {"role": "user", "content": "Weather in Rome?"}, *follow_up[2:]]
    response = client.chat.completions.create(model=model, messages=rewritten, max_tokens=3, temperature=0)
    assert response.choices[0].message is not None
    third = _llm_records(store, "ro-a")[-1]
    assert not third.prefix_reused
    assert live.engine.tokenizer.decode(third.prompt_ids) == _render(live.fmt, rewritten)


def test_continue_final_message_returns_only_the_continuation(live: Live, store: MemoryStore) -> None:
    client = live.client()
    model = live.engine.model_name
    messages = [*QUESTION, {"role": "assistant", "content": "final_choice:"}]
    response = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=4,
        temperature=0,
        extra_body={"continue_final_message": True},
    )
    [record] = _llm_records(store, "ro-a")
    tokenizer = live.engine.tokenizer
    assert tokenizer.decode(record.prompt_ids).endswith("<|im_start|>assistant\nfinal_choice:")
    continuation = response.choices[0].message.content
    assert continuation == tokenizer.decode(record.completion_ids, skip_special_tokens=True)
    # the agent keeps the whole message (prefix + continuation) and goes on: that turn's ids are reused
    whole = {"role": "assistant", "content": "final_choice:" + continuation}
    client.chat.completions.create(
        model=model,
        messages=[*QUESTION, whole, {"role": "user", "content": "Why?"}],
        max_tokens=2,
        temperature=0,
    )
    second = _llm_records(store, "ro-a")[-1]
    assert second.prefix_reused
    assert second.prompt_ids[: len(record.prompt_ids) + len(record.completion_ids)] == (
        record.prompt_ids + record.completion_ids
    )


# -- tool calls (ScriptedEngine, see the module docstring) ------------------------------------------------
def test_generated_tool_call_is_returned_as_tool_calls(tool_live: Live, store: MemoryStore) -> None:
    response = tool_live.client().chat.completions.create(
        model="scripted", messages=QUESTION, tools=WEATHER_TOOLS
    )
    [choice] = response.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}

    [record] = _llm_records(store, "ro-a")
    assert record.tool_calls == [call.model_dump()]
    assert record.tool_call_error is None and record.finish_reason == "tool_calls"
    assert (
        record.text
        == CALL_TEXT
        == tool_live.engine.tokenizer.decode(record.completion_ids, skip_special_tokens=True)
    )
    assert record.tools == WEATHER_TOOLS
    # the fallback listed the tool in the prompt
    assert "get_weather" in tool_live.engine.tokenizer.decode(record.prompt_ids)


def test_streamed_tool_call_arrives_as_tool_call_deltas(tool_live: Live) -> None:
    chunks = list(
        tool_live.client().chat.completions.create(
            model="scripted", messages=QUESTION, tools=WEATHER_TOOLS, stream=True
        )
    )
    deltas = [call for chunk in chunks for call in chunk.choices[0].delta.tool_calls or ()]
    assert [(d.index, d.function.name, json.loads(d.function.arguments)) for d in deltas] == [
        (0, "get_weather", {"city": "Paris"})
    ]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_and_unknown_tools_keep_the_text(tool_live: Live, store: MemoryStore) -> None:
    client = tool_live.client()
    plain = client.chat.completions.create(
        model="scripted", messages=QUESTION, tools=WEATHER_TOOLS, tool_choice="none"
    )
    assert plain.choices[0].message.content == CALL_TEXT and plain.choices[0].message.tool_calls is None
    other_tool = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    unknown = client.chat.completions.create(model="scripted", messages=QUESTION, tools=other_tool)
    assert unknown.choices[0].message.content == CALL_TEXT and unknown.choices[0].finish_reason == "stop"
    records = _llm_records(store, "ro-a")
    assert records[0].tool_call_error is None  # tools were switched off: nothing was attempted
    assert "get_weather" not in tool_live.engine.tokenizer.decode(records[0].prompt_ids)
    assert (
        records[1].tool_call_error is not None and "unknown tool 'get_weather'" in records[1].tool_call_error
    )


def test_tool_turns_reuse_the_sampled_ids_verbatim(tool_live: Live, store: MemoryStore) -> None:
    """Three turns (call, result, call, result, call): each prompt extends the previous prompt + completion.

    The scripted ids are a non-canonical tokenisation, and the call is written unlike the fallback renders
    calls: neither re-tokenising nor re-rendering would give these ids back."""
    client = tool_live.client()
    messages = list(QUESTION)
    for turn in range(3):
        response = client.chat.completions.create(model="scripted", messages=messages, tools=WEATHER_TOOLS)
        message = response.choices[0].message
        result = {
            "role": "tool",
            "tool_call_id": message.tool_calls[0].id,
            "content": f"sunny, {20 + turn} C",
        }
        messages += [message.model_dump(exclude_none=True), result]
    records = _llm_records(store, "ro-a")
    assert tool_live.fmt.tokenize(CALL_TEXT) != records[0].completion_ids[:-1]
    assert [record.prefix_reused for record in records] == [False, True, True]
    for previous, record in itertools.pairwise(records):
        reused = previous.prompt_ids + previous.completion_ids
        assert record.prompt_ids[: len(reused)] == reused
    first_turn = records[0].prompt_ids + records[0].completion_ids
    tail = tool_live.engine.tokenizer.decode(records[1].prompt_ids[len(first_turn) :])
    expected = "\n<|im_start|>tool\n<tool_response>\nsunny, 20 C\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    assert tail == expected


def test_stop_string_truncates_text_and_ids(engine: TransformersEngine, store: MemoryStore) -> None:
    scripted = ScriptedEngine(engine.tokenizer, "The room is Nova. Done.")
    for live in _serve(scripted, store):
        response = live.client().chat.completions.create(
            model="scripted", messages=QUESTION, stop=["Nova", "zzz"]
        )
    assert response.choices[0].message.content == "The room is "
    assert response.choices[0].finish_reason == "stop"
    [record] = _llm_records(store, "ro-a")
    kept = scripted.tokenizer.decode(record.completion_ids)
    assert kept.startswith("The room is Nova") and "Done" not in kept
    assert len(record.logprobs) == len(record.completion_ids) < len(scripted.completion_ids)


def test_concurrent_rollouts_keep_their_own_sessions(live: Live, store: MemoryStore) -> None:
    """Two agents talking at once (their requests share engine batches) each extend only their own turns."""

    def agent(rollout_id: str, topic: str) -> None:
        client = live.client(rollout_id)
        messages = [{"role": "user", "content": f"Tell me about {topic}."}]
        for _ in range(2):
            response = client.chat.completions.create(
                model=live.engine.model_name, messages=messages, max_tokens=4, temperature=0
            )
            messages += [
                response.choices[0].message.model_dump(exclude_none=True),
                {"role": "user", "content": "More."},
            ]

    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(agent, ["ro-a", "ro-b"], ["rooms", "clocks"]))
    for rollout_id, topic in (("ro-a", "rooms"), ("ro-b", "clocks")):
        first, second = _llm_records(store, rollout_id)
        assert topic in live.engine.tokenizer.decode(first.prompt_ids)
        assert second.prefix_reused
        assert second.prompt_ids[: len(first.prompt_ids) + len(first.completion_ids)] == (
            first.prompt_ids + first.completion_ids
        )


def test_spans_go_to_the_sqlite_store(engine: TransformersEngine, tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "store.sqlite")
    store.enqueue_rollouts([Rollout(rollout_id="ro-s", task=Task(id="t", payload={}))])
    assert store.claim_rollout("worker") is not None
    for live in _serve(engine, store):
        response = live.client("ro-s").chat.completions.create(
            model=engine.model_name, messages=QUESTION, max_tokens=3, temperature=0, tools=WEATHER_TOOLS
        )
    [record] = [LLMCallRecord.model_validate(span.attributes) for span in store.get_spans("ro-s")]
    assert record.text == response.choices[0].message.content and record.tools == WEATHER_TOOLS
    store.close()


# -- routes, models, attribution --------------------------------------------------------------------------
def test_plain_v1_calls_are_served_but_not_recorded(live: Live, store: MemoryStore) -> None:
    response = live.client(rollout_id=None).chat.completions.create(
        model=live.engine.model_name, messages=QUESTION, max_tokens=2
    )
    assert response.choices[0].message.content is not None
    assert all(store.get_spans(rid) == [] for rid in ("ro-a", "ro-b", "ro-done"))


def test_models_and_the_policy_alias(live: Live, store: MemoryStore) -> None:
    names = [model.id for model in live.client().models.list()]
    assert names == [live.engine.model_name, "policy-v0"]
    assert httpx.get(f"{live.url}/health").json()["status"] == "ok"
    live.client().chat.completions.create(model="policy-v0", messages=QUESTION, max_tokens=2)
    assert [record.model for record in _llm_records(store, "ro-a")] == ["policy-v0"]


# -- errors -----------------------------------------------------------------------------------------------
def _post(live: Live, body: Any, rollout_id: str = "ro-a", **kwargs: Any) -> httpx.Response:
    content = body if isinstance(body, str) else json.dumps(body)
    url = f"{live.url}/rollouts/{rollout_id}/v1/chat/completions"
    return httpx.post(
        url, content=content, headers={"content-type": "application/json"}, timeout=30, **kwargs
    )


def _error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_errors_are_openai_shaped_and_leave_the_store_alone(live: Live, store: MemoryStore) -> None:
    model = live.engine.model_name
    ok = {"model": model, "messages": QUESTION, "max_tokens": 2}
    assert _error(_post(live, '{"model": "x", "messages": ['), 400)["type"] == "invalid_request_error"
    assert "JSON object" in _error(_post(live, [1, 2]), 400)["message"]
    assert _error(_post(live, {"model": model}), 400)["param"] == "messages"
    assert _error(_post(live, {**ok, "temperature": 7}), 400)["param"] == "temperature"
    bad_role = {**ok, "messages": [{"role": "robot", "content": "hi"}]}
    assert _error(_post(live, bad_role), 400)["param"].startswith("messages.0.role")
    assert _error(_post(live, {**ok, "model": "gpt-9"}), 404)["code"] == "model_not_found"
    assert _error(_post(live, {**ok, "n": 5}), 400)["param"] == "n"  # max_n is 4 here
    too_long = {**ok, "messages": [{"role": "user", "content": "word " * 3000}]}
    assert _error(_post(live, too_long), 400)["code"] == "context_length_exceeded"
    assert _error(_post(live, {**ok, "max_tokens": 5000}), 400)["code"] == "context_length_exceeded"
    assert _error(_post(live, {**ok, "tool_choice": "required"}), 400)["message"].endswith("needs tools")
    assert _error(_post(live, ok, rollout_id="ro-nope"), 404)["code"] == "rollout_not_found"
    assert "rollout already finished" in _error(_post(live, ok, rollout_id="ro-done"), 409)["message"]
    assert all(store.get_spans(rid) == [] for rid in ("ro-a", "ro-b", "ro-done"))
    # the gateway and the other rollouts are unaffected
    assert _post(live, ok, rollout_id="ro-b").status_code == 200
    assert len(store.get_spans("ro-b")) == 1 and store.get_spans("ro-a") == []


def test_openai_client_sees_typed_errors(live: Live) -> None:
    with pytest.raises(openai.NotFoundError, match="model_not_found|does not exist"):
        live.client().chat.completions.create(model="gpt-9", messages=QUESTION)
    with pytest.raises(openai.ConflictError, match="rollout already finished"):
        live.client("ro-done").chat.completions.create(model=live.engine.model_name, messages=QUESTION)


def test_engine_failure_is_a_503(tiny_engine: TransformersEngine, store: MemoryStore) -> None:
    for live in _serve(tiny_engine, store):
        tiny_engine.close()
        error = _error(
            _post(live, {"model": tiny_engine.model_name, "messages": QUESTION, "max_tokens": 2}), 503
        )
        assert error["type"] == "engine_unavailable" and "closed" in error["message"]
        assert _post(live, {"model": "gpt-9", "messages": QUESTION}, rollout_id="ro-b").status_code == 404
    assert store.get_spans("ro-a") == []


class StoppingEngine(ScriptedEngine):
    """An engine shutting down under a request: its generation is cancelled, as an engine's pending requests are
    when it stops or the event loop ends."""

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        raise asyncio.CancelledError


def test_a_generation_cancelled_by_shutdown_is_a_503_not_a_traceback(
    engine: TransformersEngine, store: MemoryStore, caplog: pytest.LogCaptureFixture
) -> None:
    for live in _serve(StoppingEngine(engine.tokenizer, "Sunny."), store):
        error = _error(_post(live, {"model": "scripted", "messages": QUESTION, "max_tokens": 2}), 503)
        assert error["code"] == "server_shutting_down" and "shutting down" in error["message"]
    assert "Exception in ASGI application" not in caplog.text


class StoppingMidStreamEngine(ScriptedEngine):
    """An engine that streams its first token, then stops (shutdown) under the request."""

    streams_tokens = True

    async def generate(self, request: GenerationRequest, on_token: Any = None) -> GenerationResult:
        on_token(0, self.completion_ids[0], -0.5)
        await asyncio.sleep(0.05)  # the first chunk leaves before the generation is cancelled
        raise asyncio.CancelledError


def test_a_stream_cancelled_by_shutdown_ends_with_the_503_error_not_a_traceback(
    engine: TransformersEngine, store: MemoryStore, caplog: pytest.LogCaptureFixture
) -> None:
    for live in _serve(StoppingMidStreamEngine(engine.tokenizer, "Sunny."), store):
        with pytest.raises(openai.APIError, match="shutting down"):
            list(live.client().chat.completions.create(model="scripted", messages=QUESTION, stream=True))
        response = _post(live, {"model": "scripted", "messages": QUESTION, "stream": True})
        assert response.status_code == 200 and '"server_shutting_down"' in response.text
    assert "Exception in ASGI application" not in caplog.text


def test_finished_rollout_drops_its_session(live: Live, store: MemoryStore) -> None:
    live.client().chat.completions.create(model=live.engine.model_name, messages=QUESTION, max_tokens=2)
    assert len(live.service.sessions) == 1
    store.finish_attempt("ro-a", 1, RolloutStatus.SUCCEEDED, reward=0.5)
    with pytest.raises(openai.ConflictError):
        live.client().chat.completions.create(model=live.engine.model_name, messages=QUESTION, max_tokens=2)
    assert len(live.service.sessions) == 0


def test_api_key_is_enforced_and_never_recorded(engine: TransformersEngine, store: MemoryStore) -> None:
    for live in _serve(engine, store, api_key="s3cret-key"):
        assert _error(httpx.get(f"{live.url}/health"), 401)["type"] == "authentication_error"
        wrong = {"Authorization": "Bearer nope"}
        assert httpx.get(f"{live.url}/v1/models", headers=wrong).status_code == 401
        assert _post(live, {"model": "x", "messages": QUESTION}).status_code == 401
        with pytest.raises(openai.AuthenticationError):
            live.client(api_key="nope").chat.completions.create(
                model=live.engine.model_name, messages=QUESTION
            )
        live.client(api_key="s3cret-key").chat.completions.create(
            model=live.engine.model_name, messages=QUESTION, max_tokens=2
        )
    [span] = store.get_spans("ro-a")
    assert "s3cret" not in span.model_dump_json()


def test_non_loopback_bind_needs_an_api_key(engine: TransformersEngine) -> None:
    with pytest.raises(InsecureBindError, match="without an API key"):
        GatewayServer(create_app(engine, None), host="0.0.0.0")
    GatewayServer(create_app(engine, None, api_key="k"), host="0.0.0.0")  # allowed with a key
    GatewayServer(create_app(engine, None), host="::1")  # loopback needs none


# -- sessions -----------------------------------------------------------------------------------------------
def test_sessions_are_bounded_by_rollout_attempt_and_lru(live: Live) -> None:
    fmt = live.fmt
    sessions = SessionStore(fmt, max_sessions=2)
    messages = [ChatMessage.model_validate(message) for message in QUESTION]
    completion = [*fmt.tokenize("Sunny."), fmt.tokenizer.eos_token_id]
    reply = ChatMessage(role="assistant", content="Sunny.")
    follow_up = [*messages, reply, ChatMessage(role="user", content="Thanks")]
    for rollout_id in ("ro-1", "ro-2", "ro-3"):
        key = SessionKey(rollout_id, 1)
        sessions.record(key, messages, sessions.plan(key, messages, None), completion, reply.key())
    assert len(sessions) == 2
    # ro-1 was the least recently used: gone
    assert not sessions.plan(SessionKey("ro-1", 1), follow_up, None).prefix_reused
    assert sessions.plan(SessionKey("ro-3", 1), follow_up, None).prefix_reused
    assert not sessions.plan(SessionKey("ro-3", 2), follow_up, None).prefix_reused  # a retry starts afresh
    sessions.drop("ro-3")
    assert not sessions.plan(SessionKey("ro-3", 1), follow_up, None).prefix_reused

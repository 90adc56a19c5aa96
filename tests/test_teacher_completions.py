"""Teacher completions: a reply given to the gateway (``rltrain_completion``) is tokenised like a sampled one.

The stock openai client sends the extension field through ``extra_body``; the gateway templates the prompt as
for any request, appends the reply's tokens and the end-of-turn token, never calls the engine, and records an
llm span flagged ``teacher`` whose rows the trajectory adapter builds exactly like a rollout's.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest
from weather_tool import WEATHER_TOOL

from rltrain.adapters.trajectories import TrajectoryAdapter
from rltrain.engines.transformers import TransformersEngine
from rltrain.gateway import GatewayServer, create_app
from rltrain.gateway.schemas import ChatMessage, ToolSpec
from rltrain.store.memory import MemoryStore
from rltrain.types import LLMCallRecord, Rollout, RolloutStatus, Task

QUESTION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Which room is free?"},
]


@pytest.fixture
def store() -> MemoryStore:
    """Rollout ``ro-t`` running (attempt 1)."""
    store = MemoryStore()
    store.enqueue_rollouts([Rollout(rollout_id="ro-t", task=Task(id="t", payload={}))])
    assert store.claim_rollout("worker") is not None
    return store


@pytest.fixture
def served(engine: TransformersEngine, store: MemoryStore) -> Iterator[tuple[openai.OpenAI, Any]]:
    """An openai client attributed to ``ro-t`` and the gateway's chat service."""
    app = create_app(engine, store)
    with GatewayServer(app) as server:
        client = openai.OpenAI(base_url=f"{server.base_url}/rollouts/ro-t/v1", api_key="unused", max_retries=0)
        yield client, app.state.service


def _records(store: MemoryStore) -> list[LLMCallRecord]:
    return [LLMCallRecord.model_validate(span.attributes) for span in store.get_spans("ro-t")]


def _teach(client: openai.OpenAI, engine: TransformersEngine, messages: list[dict[str, Any]], text: str,
           **extra: Any) -> Any:
    return client.chat.completions.create(
        model=engine.model_name, messages=messages, max_tokens=1,  # type: ignore[arg-type]
        extra_body={"rltrain_completion": text, **extra.pop("extra_body", {})}, **extra,
    )


def _rendered_ids(service: Any, messages: list[dict[str, Any]], *, continue_final_message: bool = False,
                  tools: list[dict[str, Any]] | None = None) -> list[int]:
    fmt = service.chat_format
    text = fmt.render([ChatMessage.model_validate(m) for m in messages],
                      [ToolSpec.model_validate(t) for t in tools] if tools else None,
                      continue_final_message=continue_final_message)
    return fmt.tokenize(text)


def test_teacher_reply_is_prompt_ids_plus_its_tokens_plus_end_of_turn(
    served: tuple[openai.OpenAI, Any], engine: TransformersEngine, store: MemoryStore
) -> None:
    client, service = served
    requests_before = engine.stats.requests
    text = "Lyra is free, and it is the best fit for twelve people."
    response = _teach(client, engine, QUESTION, text)
    assert engine.stats.requests == requests_before, "a teacher reply must not reach the engine"
    [choice] = response.choices
    assert (choice.message.content, choice.finish_reason) == (text, "stop")

    [record] = _records(store)
    tokenizer = engine.tokenizer
    # longer than max_tokens=1: a given reply is not cut to the sampling budget
    assert record.completion_ids == [*tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    assert record.prompt_ids == _rendered_ids(service, QUESTION)
    assert record.teacher and record.logprobs == [0.0] * len(record.completion_ids)
    assert (record.text, record.finish_reason, record.policy_version) == (text, "stop", engine.policy_version)
    assert response.usage.completion_tokens == len(record.completion_ids)


def test_teacher_continues_a_final_assistant_message(
    served: tuple[openai.OpenAI, Any], engine: TransformersEngine, store: MemoryStore
) -> None:
    client, service = served
    messages = [*QUESTION, {"role": "assistant", "content": "final_choice:"}]
    response = _teach(client, engine, messages, " Lyra", extra_body={"continue_final_message": True})
    assert response.choices[0].message.content == " Lyra"
    [record] = _records(store)
    assert record.prompt_ids == _rendered_ids(service, messages, continue_final_message=True)
    assert engine.tokenizer.decode(record.prompt_ids + record.completion_ids).endswith(
        "<|im_start|>assistant\nfinal_choice: Lyra<|im_end|>"
    )


def test_two_turn_teacher_conversation_is_one_prefix_consistent_row(
    served: tuple[openai.OpenAI, Any], engine: TransformersEngine, store: MemoryStore
) -> None:
    client, _ = served
    first = _teach(client, engine, QUESTION, "Lyra.").choices[0].message.model_dump(exclude_none=True)
    _teach(client, engine, [*QUESTION, first, {"role": "user", "content": "Sure?"}], "Yes, Lyra.")
    one, two = _records(store)
    assert two.prefix_reused
    assert two.prompt_ids[: len(one.prompt_ids) + len(one.completion_ids)] == one.prompt_ids + one.completion_ids

    store.finish_attempt("ro-t", 1, RolloutStatus.SUCCEEDED, reward=1.0)
    result = TrajectoryAdapter().adapt(store.get_rollout("ro-t"), store.get_spans("ro-t"))
    [row] = result.rows
    assert result.forked_rows == 0
    between = len(two.prompt_ids) - len(one.prompt_ids) - len(one.completion_ids)
    assert row.prompt_ids == one.prompt_ids
    assert row.env_mask == [1] * len(one.completion_ids) + [0] * between + [1] * len(two.completion_ids)
    assert row.prompt_ids + row.completion_ids == two.prompt_ids + two.completion_ids


def test_teacher_tool_calls_are_parsed_and_the_tool_turn_reuses_them(
    served: tuple[openai.OpenAI, Any], engine: TransformersEngine, store: MemoryStore
) -> None:
    client, _ = served
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    response = _teach(client, engine, QUESTION, call, tools=[WEATHER_TOOL])
    [choice] = response.choices
    assert choice.finish_reason == "tool_calls"
    [tool_call] = choice.message.tool_calls
    assert (tool_call.function.name, tool_call.function.arguments) == ("get_weather", '{"city": "Paris"}')
    reply = choice.message.model_dump(exclude_none=True)
    result = {"role": "tool", "tool_call_id": tool_call.id, "content": "sunny"}
    _teach(client, engine, [*QUESTION, reply, result], "It is sunny.", tools=[WEATHER_TOOL])
    one, two = _records(store)
    assert one.tool_calls is not None and two.prefix_reused and two.teacher
    assert two.prompt_ids[: len(one.prompt_ids) + len(one.completion_ids)] == one.prompt_ids + one.completion_ids


def test_teacher_reply_needs_n_of_one(served: tuple[openai.OpenAI, Any], engine: TransformersEngine,
                                      store: MemoryStore) -> None:
    client, _ = served
    with pytest.raises(openai.BadRequestError, match="n must be 1, got n=2"):
        _teach(client, engine, QUESTION, "Lyra.", n=2)
    assert store.get_spans("ro-t") == []

"""Forks and cut replies, explained where the user looks.

A call that does not extend its rollout's earlier turn splits the rollout into several training rows. The gateway
names the cause (tools differ, system prompt differs, the template re-renders history, history rewritten) once
per rollout at WARNING with the fix, records it in the llm span, and the trajectory adapter counts rows by cause.
A reply cut by ``max_tokens`` is counted in the evaluation summary (the eval table's ``cut`` column), and the
warm start refuses demonstrations the policy could not write within ``max_tokens``.

Replies are given to the gateway (``rltrain_completion``) so that a tiny random model holds a real multi-turn
conversation: the prompts are rendered and tokenised by the real gateway either way.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from test_sft import room_recipe
from weather_tool import CALL_BLOCK, WEATHER_TOOL

from rltrain.adapters.trajectories import TrajectoryAdapter
from rltrain.algorithms.sft import WarmStartError, collect_demonstrations
from rltrain.engines.transformers import TransformersEngine
from rltrain.gateway import GatewayServer, create_app
from rltrain.metrics import summarise
from rltrain.models import load_model_and_tokenizer
from rltrain.recipes import WarmStartConfig
from rltrain.serving import ServingStack
from rltrain.store.memory import MemoryStore
from rltrain.trainer import Trainer
from rltrain.types import LLMCallRecord, Rollout, RolloutStatus, SpanKind, Task

SYSTEM = {"role": "system", "content": "You answer briefly."}
QUESTION = [SYSTEM, {"role": "user", "content": "Weather in Paris?"}]
SESSIONS_LOGGER = "rltrain.gateway.sessions"


@pytest.fixture
def store() -> MemoryStore:
    store = MemoryStore()
    store.enqueue_rollouts([Rollout(rollout_id="ro-f", task=Task(id="t", payload={}))])
    assert store.claim_rollout("worker") is not None
    return store


@pytest.fixture
def client(engine: TransformersEngine, store: MemoryStore) -> Iterator[openai.OpenAI]:
    with GatewayServer(create_app(engine, store)) as server:
        yield openai.OpenAI(base_url=f"{server.base_url}/rollouts/ro-f/v1", api_key="unused", max_retries=0)


def _say(client: openai.OpenAI, messages: list[dict[str, Any]], text: str, **kwargs: Any) -> dict[str, Any]:
    response = client.chat.completions.create(
        model="policy-v0", messages=messages, max_tokens=1,  # type: ignore[arg-type]
        extra_body={"rltrain_completion": text}, **kwargs,
    )
    return response.choices[0].message.model_dump(exclude_none=True)


def _tool_turn(client: openai.OpenAI) -> list[dict[str, Any]]:
    """The first turn (a tool call, with tools) and the tool result: what a tool agent sends next."""
    call = _say(client, QUESTION, CALL_BLOCK, tools=[WEATHER_TOOL])
    assert call["tool_calls"], "the gateway parses the given tool call"
    result = {"role": "tool", "tool_call_id": call["tool_calls"][0]["id"], "content": '{"temp_c": 18}'}
    return [*QUESTION, call, result]


def _records(store: MemoryStore) -> list[LLMCallRecord]:
    return [LLMCallRecord.model_validate(s.attributes) for s in store.get_spans("ro-f") if s.kind is SpanKind.LLM]


def _adapt(store: MemoryStore) -> Any:
    store.finish_attempt("ro-f", 1, RolloutStatus.SUCCEEDED, reward=1.0)
    return TrajectoryAdapter().adapt(store.get_rollout("ro-f"), store.get_spans("ro-f"))


def _fork_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == SESSIONS_LOGGER and r.levelno == logging.WARNING]


def test_second_call_without_tools_warns_once_that_tools_differ_and_counts_the_cause(
    client: openai.OpenAI, store: MemoryStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=SESSIONS_LOGGER)
    history = _tool_turn(client)
    answer = _say(client, history, "18 degrees.")  # the Agent Lightning pattern: no tools= on the second call
    _say(client, [*history, answer, {"role": "user", "content": "Sure?"}], "Yes.", tools=[WEATHER_TOOL])

    [warning] = _fork_warnings(caplog)  # two forks, one warning: once per rollout
    assert "ro-f" in warning and "tools differ" in warning and "pass the same tools=" in warning
    first, second, third = _records(store)
    assert (first.fork_cause, second.fork_cause, third.fork_cause) == (None, "tools_differ", "tools_differ")
    assert not second.prefix_reused and not third.prefix_reused

    # The third call, rendered with the tools again, extends the first call's tokens: the adapter puts it in that
    # row, so only the second call started a row of its own.
    result = _adapt(store)
    assert len(result.rows) == 2 and result.forked_rows == 1
    assert result.metrics()["adapter/fork_causes/tools_differ"] == 1.0
    assert result.rows[0].prompt_ids + result.rows[0].completion_ids == third.prompt_ids + third.completion_ids


def test_same_tools_on_every_call_is_one_row_with_the_tool_result_masked(
    client: openai.OpenAI, store: MemoryStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=SESSIONS_LOGGER)
    _say(client, _tool_turn(client), "18 degrees.", tools=[WEATHER_TOOL])
    assert not _fork_warnings(caplog)
    first, second = _records(store)
    assert second.prefix_reused and second.fork_cause is None
    result = _adapt(store)
    [row] = result.rows
    assert result.forked_rows == 0 and not result.fork_causes
    between = len(second.prompt_ids) - len(first.prompt_ids) - len(first.completion_ids)
    assert row.env_mask == [1] * len(first.completion_ids) + [0] * between + [1] * len(second.completion_ids)


def test_a_changed_system_prompt_is_named_and_another_conversation_is_no_fork(
    client: openai.OpenAI, store: MemoryStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=SESSIONS_LOGGER)
    reply = _say(client, QUESTION, "Sunny.")
    changed = [{"role": "system", "content": "You answer in detail."}, QUESTION[1], reply,
               {"role": "user", "content": "And tomorrow?"}]
    _say(client, changed, "Rain.")
    _say(client, [SYSTEM, {"role": "user", "content": "Something else entirely."}], "Fine.")  # a second agent
    [warning] = _fork_warnings(caplog)
    assert "system prompt differs" in warning and "same system message" in warning
    assert [r.fork_cause for r in _records(store)] == [None, "system_prompt_differs", None]
    result = _adapt(store)
    assert result.fork_causes == {"system_prompt_differs": 1, "new_conversation": 1}


def test_an_edited_earlier_message_is_named_history_rewritten(
    client: openai.OpenAI, store: MemoryStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=SESSIONS_LOGGER)
    _say(client, QUESTION, "Sunny.")
    _say(client, [*QUESTION, {"role": "assistant", "content": "Cloudy."}, {"role": "user", "content": "Hm?"}], "Yes.")
    [warning] = _fork_warnings(caplog)
    assert "do not extend an earlier turn" in warning
    assert [r.fork_cause for r in _records(store)] == [None, "history_rewritten"]


def test_replies_cut_by_max_tokens_are_counted_in_the_eval_summary(
    engine: TransformersEngine, store: MemoryStore, client: openai.OpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    _say(client, QUESTION, "Sunny.")  # a whole reply
    for _ in range(2):  # sampled with a budget the tiny random model does not stop within
        client.chat.completions.create(model="policy-v0", messages=QUESTION, max_tokens=2, temperature=0.0)  # type: ignore[arg-type]
    records = _records(store)
    cut = sum(r.finish_reason == "length" for r in records)
    assert records[0].finish_reason == "stop" and cut >= 1
    store.finish_attempt("ro-f", 1, RolloutStatus.SUCCEEDED, reward=1.0)
    rollout = store.get_rollout("ro-f")
    with caplog.at_level(logging.WARNING, logger="rltrain.metrics"):
        summary = summarise("set", [rollout], {"ro-f": store.get_spans("ro-f")}, {"ro-f": "x"}, 1.0)
    assert (summary.cut_replies, summary.llm_calls, summary.parseable) == (cut, 3, 1.0)
    assert any("cut by max_tokens" in r.getMessage() and "sampling.eval.max_tokens" in r.getMessage()
               for r in caplog.records)


def test_warm_start_refuses_demonstrations_longer_than_max_tokens(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The inline teacher's reply `` Lyra<|im_end|>`` is longer than one token: no policy limited to one token a
    reply could write it, so the warm start stops, naming the setting and the length it needs."""
    recipe = room_recipe(tmp_path, tiny_model_dir, sampling={"eval": {"temperature": 0.0, "max_tokens": 1}})
    trainer = Trainer(recipe, progress=False)
    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir))
    try:
        with ServingStack(recipe, trainer.store, model=model, tokenizer=tokenizer) as stack, \
                pytest.raises(WarmStartError, match=r"longer than sampling\.eval\.max_tokens=1 tokens") as caught:
            collect_demonstrations(trainer.run, stack, WarmStartConfig())
    finally:
        trainer.close()
    assert "raise sampling.eval.max_tokens to at least" in str(caught.value)

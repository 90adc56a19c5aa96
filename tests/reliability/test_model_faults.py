"""Model faults: completions cut by ``max_tokens``, malformed or hallucinated tool calls (unknown tool, bad JSON,
wrong argument types, a block left open) and empty text. Each is recorded in the llm span, answered as plain
text or as a tool error the agent can see, graded as a wrong answer, and turned into training rows: never an
exception in the gateway, the runner or the adapter.

The room-selection tool agent runs unchanged through the runner and the gateway. A tiny random model cannot be
made to write a given tool call (see tests/test_gateway.py), so the malformed completions come from
``ScriptedEngine``, the Engine protocol over fixed token ids: the gateway sees token ids either way, and
everything after the engine is the real path.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from live_gateway import serve
from test_gateway import ScriptedEngine

from rltrain.adapters.trajectories import TrajectoryAdapter
from rltrain.engines.transformers import TransformersEngine
from rltrain.envs import get_env
from rltrain.envs.room_selection import RoomSelectionEnv
from rltrain.envs.room_selection.tools import TOOL_NAME
from rltrain.recipes import RunnerConfig
from rltrain.runner import Runner, RunResult
from rltrain.store import SqliteStore
from rltrain.types import LLMCallRecord, LLMResource, Resources, RolloutStatus, SamplingParams, Span, SpanKind

GOOD_CALL = f'{{"name": "{TOOL_NAME}", "arguments": {{"date": "2025-10-13", "time": "09:00", "duration_min": 30}}}}'


@pytest.fixture(scope="module")
def env() -> RoomSelectionEnv:
    return get_env("room_selection")


def run_agent(env: RoomSelectionEnv, mode: str, url: str, model: str, store: SqliteStore,
              max_tokens: int = 40) -> RunResult:
    resources = Resources(
        llm=LLMResource(base_url="", model=model, sampling=SamplingParams(max_tokens=max_tokens)),
        prompts=env.default_prompts(mode),
    )
    runner = Runner(store, env.agent(mode), url, RunnerConfig(concurrency=2, timeout_s=60), progress=False)
    return asyncio.run(runner.run(env.load_tasks("public:val")[:2], resources, mode="eval"))


def llm_records(spans: list[Span]) -> list[LLMCallRecord]:
    return [LLMCallRecord.model_validate(s.attributes) for s in spans if s.kind is SpanKind.LLM]


def assert_graded_wrong_and_trainable(env: RoomSelectionEnv, store: SqliteStore, result: RunResult) -> None:
    """Every rollout finished normally with reward 0 and no answer, and the adapter turns it into a row."""
    assert [r.status for r in result.rollouts] == [RolloutStatus.SUCCEEDED] * 2
    assert [r.reward for r in result.rollouts] == [0.0, 0.0]
    spans = [store.get_spans(r.rollout_id) for r in result.rollouts]
    assert [env.answer_of(s) for s in spans] == [None, None]
    assert not any(span.kind is SpanKind.EXCEPTION for s in spans for span in s)
    rows = TrajectoryAdapter().adapt_many(zip(result.rollouts, spans, strict=True)).rows
    assert {row.rollout_id for row in rows} == {r.rollout_id for r in result.rollouts}
    assert all(row.reward == 0.0 and sum(row.env_mask) > 0 for row in rows)


@pytest.mark.parametrize(
    ("completion", "recorded_error"),
    [
        ('<tool_call>{"name": "book_room", "arguments": {}}</tool_call>', "unknown tool 'book_room'"),
        (f'<tool_call>{{"name": "{TOOL_NAME}", "arguments": {{date: 1}}}}</tool_call>', "invalid JSON"),
        (f'<tool_call>{{"name": "{TOOL_NAME}", "arguments": "tomorrow"}}</tool_call>', "must be a JSON object"),
        (f"<tool_call>{GOOD_CALL[:40]}", "is not closed"),  # cut by max_tokens inside the block
        ("", None),  # empty text
    ],
    ids=["unknown-tool", "bad-json", "arguments-not-object", "unclosed-block", "empty-text"],
)
def test_malformed_completion_is_recorded_as_text_and_graded_wrong(
    engine: TransformersEngine, env: RoomSelectionEnv, tmp_path: Path, completion: str, recorded_error: str | None
) -> None:
    store = SqliteStore(tmp_path / "store.sqlite")
    with serve(ScriptedEngine(engine.tokenizer, completion), store) as served:
        result = run_agent(env, "tool", served.url, "scripted", store)
    for rollout in result.rollouts:
        [record] = llm_records(store.get_spans(rollout.rollout_id))
        assert record.text == completion and record.tool_calls is None
        assert record.finish_reason == "stop"
        if recorded_error is None:
            assert record.tool_call_error is None
        else:
            assert recorded_error in record.tool_call_error
    assert_graded_wrong_and_trainable(env, store, result)
    store.close()


def test_tool_arguments_of_the_wrong_type_never_reach_the_tool(
    engine: TransformersEngine, env: RoomSelectionEnv, tmp_path: Path
) -> None:
    """A well-formed call with mistyped arguments is returned as a tool call; the environment validates the
    arguments before running the tool, and the model is told what was wrong, turn after turn."""
    wrong = f'<tool_call>{{"name": "{TOOL_NAME}", "arguments": {{"date": 20251013, "time": "9am", ' \
            '"duration_min": "thirty"}}</tool_call>'
    store = SqliteStore(tmp_path / "store.sqlite")
    with serve(ScriptedEngine(engine.tokenizer, wrong), store) as served:
        result = run_agent(env, "tool", served.url, "scripted", store)
    for rollout in result.rollouts:
        spans = store.get_spans(rollout.rollout_id)
        records = llm_records(spans)
        assert len(records) == 4  # the agent's max_turns: every turn called the tool and was told why it failed
        assert all(r.finish_reason == "tool_calls" and r.tool_call_error is None for r in records)
        tools = [s for s in spans if s.kind is SpanKind.TOOL]
        assert len(tools) == 4
        for span in tools:
            assert span.attributes["result"] is None, "the tool never ran"
            error = span.attributes["error"]
            assert "invalid arguments" in error and "date" in error and "duration_min" in error
    assert_graded_wrong_and_trainable(env, store, result)
    store.close()


def test_completion_cut_by_max_tokens_is_recorded_and_graded(
    engine: TransformersEngine, env: RoomSelectionEnv, tmp_path: Path
) -> None:
    store = SqliteStore(tmp_path / "store.sqlite")
    with serve(engine, store) as served:
        result = run_agent(env, "inline", served.url, engine.model_name, store, max_tokens=3)
    for rollout in result.rollouts:
        [record] = llm_records(store.get_spans(rollout.rollout_id))
        assert record.finish_reason == "length" and len(record.completion_ids) == 3
    assert_graded_wrong_and_trainable(env, store, result)
    store.close()

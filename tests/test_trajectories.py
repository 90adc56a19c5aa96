"""The trajectory adapter on hand-built spans: merge, mask, fork, tags, attempts, rewards, counters."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rltrain.adapters.trajectories import AdapterError, TrajectoryAdapter
from rltrain.types import Rollout, Span, SpanKind, Task, Trajectory


def make_rollout(
    reward: float | None = 1.0, task_id: str = "t1", group_id: str | None = None, attempts: int = 1
):
    return Rollout(
        task=Task(id=task_id, payload={}), reward=reward, group_id=group_id, attempt_count=attempts
    )


def llm_span(
    rollout: Rollout,
    seq: int,
    prompt: list[int],
    completion: list[int],
    logprobs: list[float] | None = None,
    *,
    tag: str | None = None,
    version: int = 0,
    attempt: int = 1,
    choice: int = 0,
) -> Span:
    return Span(
        rollout_id=rollout.rollout_id,
        attempt_no=attempt,
        sequence=seq,
        kind=SpanKind.LLM,
        name="chat",
        attributes={
            "prompt_ids": prompt,
            "completion_ids": completion,
            "logprobs": logprobs if logprobs is not None else [-0.5] * len(completion),
            "policy_version": version,
            "tag": tag,
            "choice_index": choice,
        },
    )


def tool_span(rollout: Rollout, seq: int, attempt: int = 1) -> Span:
    return Span(
        rollout_id=rollout.rollout_id,
        attempt_no=attempt,
        sequence=seq,
        kind=SpanKind.TOOL,
        name="lookup",
        attributes={"arguments": {}, "result": "ok", "error": None},
    )


def assert_valid(row: Trajectory) -> None:
    """Rows are built without validation for speed; the real validator must accept them."""
    Trajectory.model_validate(row.model_dump())


def test_single_turn_is_one_row_of_policy_tokens() -> None:
    ro = make_rollout(reward=0.75, task_id="room-3")
    result = TrajectoryAdapter().adapt(ro, [llm_span(ro, 0, [1, 2, 3], [7, 8], [-0.1, -0.2], version=4)])

    assert len(result.rows) == 1
    row = result.rows[0]
    assert_valid(row)
    assert row.prompt_ids == [1, 2, 3]
    assert row.completion_ids == [7, 8]
    assert row.logprobs == [-0.1, -0.2]
    assert row.env_mask == [1, 1]
    assert (row.reward, row.group_id, row.task_id, row.policy_version) == (0.75, "room-3", "room-3", 4)
    assert row.rollout_id == ro.rollout_id
    assert result.forked_rows == 0 and result.llm_calls == 1


def test_multi_turn_masks_tool_tokens_and_keeps_ids_and_logprobs_aligned() -> None:
    ro = make_rollout()
    call1 = llm_span(ro, 0, [1, 2, 3], [10, 11], [-0.1, -0.2])
    # tool result 20 21 22 between turns, then the model answers 12
    call2 = llm_span(ro, 2, [1, 2, 3, 10, 11, 20, 21, 22], [12], [-0.3])
    call3 = llm_span(ro, 4, [1, 2, 3, 10, 11, 20, 21, 22, 12, 23], [13, 14], [-0.4, -0.5])
    spans = [call1, tool_span(ro, 1), call2, tool_span(ro, 3), call3]

    result = TrajectoryAdapter().adapt(ro, spans)

    assert len(result.rows) == 1
    row = result.rows[0]
    assert_valid(row)
    assert row.prompt_ids == [1, 2, 3]
    assert row.completion_ids == [10, 11, 20, 21, 22, 12, 23, 13, 14]
    assert row.env_mask == [1, 1, 0, 0, 0, 1, 0, 1, 1]
    assert row.logprobs == [-0.1, -0.2, 0.0, 0.0, 0.0, -0.3, 0.0, -0.4, -0.5]
    assert result.policy_tokens == 5 and result.env_tokens == 4
    assert result.llm_calls == 3 and result.forked_rows == 0


def test_spans_are_ordered_by_sequence_not_by_list_order() -> None:
    ro = make_rollout()
    call1 = llm_span(ro, 0, [1], [2])
    call2 = llm_span(ro, 1, [1, 2, 3], [4])
    result = TrajectoryAdapter().adapt(ro, [call2, call1])
    assert [r.completion_ids for r in result.rows] == [[2, 3, 4]]


def test_spans_without_a_sequence_follow_in_start_time_order() -> None:
    ro = make_rollout()
    numbered = llm_span(ro, 0, [1], [2])
    later = llm_span(ro, 0, [1, 2, 5], [6]).model_copy(update={"sequence": None, "start_time": 20.0})
    sooner = llm_span(ro, 0, [1, 2, 3], [4]).model_copy(update={"sequence": None, "start_time": 10.0})
    result = TrajectoryAdapter().adapt(ro, [later, sooner, numbered])
    assert [r.completion_ids for r in result.rows] == [[2, 3, 4], [6]]
    assert result.rows[1].prompt_ids == [1, 2, 5]


def test_rewritten_history_forks_a_new_row_and_counts_it() -> None:
    ro = make_rollout(reward=1.0)
    call1 = llm_span(ro, 0, [1, 2, 3], [10, 11])
    # the agent summarised its history: the prompt no longer starts with 1 2 3 10 11
    call2 = llm_span(ro, 1, [1, 2, 99, 11, 30], [12, 13])
    result = TrajectoryAdapter().adapt(ro, [call1, call2])

    assert result.forked_rows == 1
    assert [(r.prompt_ids, r.completion_ids, r.env_mask) for r in result.rows] == [
        ([1, 2, 3], [10, 11], [1, 1]),
        ([1, 2, 99, 11, 30], [12, 13], [1, 1]),
    ]
    assert all(r.reward == 1.0 for r in result.rows)
    assert result.metrics()["adapter/forked_rows"] == 1.0


def test_completion_changed_in_history_forks() -> None:
    """Same prompt, but the agent edited the assistant's earlier answer: not a continuation."""
    ro = make_rollout()
    call1 = llm_span(ro, 0, [1, 2], [10, 11])
    call2 = llm_span(ro, 1, [1, 2, 10, 12, 5], [13])
    result = TrajectoryAdapter().adapt(ro, [call1, call2])
    assert result.forked_rows == 1 and len(result.rows) == 2


def test_edited_earlier_prompt_forks_even_when_the_answer_is_replayed() -> None:
    """The agent edited its first message (same length) and replayed the assistant's answer verbatim."""
    ro = make_rollout()
    call1 = llm_span(ro, 0, [1, 2, 3], [10, 11])
    call2 = llm_span(ro, 1, [1, 5, 3, 10, 11, 20], [12])
    result = TrajectoryAdapter().adapt(ro, [call1, call2])
    assert result.forked_rows == 1
    assert [r.prompt_ids for r in result.rows] == [[1, 2, 3], [1, 5, 3, 10, 11, 20]]


def test_n_choices_of_one_prompt_are_separate_rows_and_the_continuation_joins_its_choice() -> None:
    ro = make_rollout()
    choice0 = llm_span(ro, 0, [1, 2], [10, 11], choice=0)
    choice1 = llm_span(ro, 1, [1, 2], [20, 21], choice=1)
    # the agent goes on from choice 0, which is not the most recent row
    follow = llm_span(ro, 2, [1, 2, 10, 11, 5], [22])
    result = TrajectoryAdapter().adapt(ro, [choice0, choice1, follow])

    assert result.forked_rows == 1
    assert [(r.prompt_ids, r.completion_ids, r.env_mask) for r in result.rows] == [
        ([1, 2], [10, 11, 5, 22], [1, 1, 0, 1]),
        ([1, 2], [20, 21], [1, 1]),
    ]


def test_a_call_that_extends_two_rows_joins_the_longer_one() -> None:
    """Choice 2 of the second prompt ([4, 5]) starts with choice 1 ([4]); the continuation of choice 2 extends
    both rows' sequences, and belongs to choice 2's row, where token 5 was sampled, not to choice 1's as env."""
    ro = make_rollout()
    spans = [
        llm_span(ro, 0, [1], [2]),
        llm_span(ro, 1, [1, 2, 3], [4], choice=0),
        llm_span(ro, 2, [1, 2, 3], [4, 5], choice=1),
        llm_span(ro, 3, [1, 2, 3, 4, 5, 6], [7]),
    ]
    result = TrajectoryAdapter().adapt(ro, spans)
    assert [(r.prompt_ids, r.completion_ids, r.env_mask) for r in result.rows] == [
        ([1], [2, 3, 4], [1, 0, 1]),
        ([1, 2, 3], [4, 5, 6, 7], [1, 1, 0, 1]),
    ]


def test_rollout_without_llm_span_gives_no_row_and_is_counted() -> None:
    ro = make_rollout(reward=1.0)
    result = TrajectoryAdapter().adapt(ro, [tool_span(ro, 0)])
    assert result.rows == []
    assert result.empty_rollouts == 1 and result.llm_calls == 0
    assert result.metrics()["adapter/empty_rollouts"] == 1.0


def test_rollout_without_reward_gives_no_row_and_is_counted() -> None:
    ro = make_rollout(reward=None)
    result = TrajectoryAdapter().adapt(ro, [llm_span(ro, 0, [1], [2])])
    assert result.rows == []
    assert result.no_reward == 1 and result.empty_rollouts == 0


def test_adapt_many_attaches_each_rollouts_reward_and_group_to_its_rows() -> None:
    a = make_rollout(reward=1.0, task_id="t1", group_id="g-a")
    b = make_rollout(reward=0.0, task_id="t2")
    c = make_rollout(reward=None, task_id="t3")
    a_spans = [llm_span(a, 0, [1], [2]), llm_span(a, 1, [9], [3])]  # forks: two rows, both reward 1.0
    b_spans = [llm_span(b, 0, [4], [5])]
    result = TrajectoryAdapter().adapt_many([(a, a_spans), (b, b_spans), (c, [llm_span(c, 0, [1], [2])])])

    assert [(r.rollout_id, r.reward, r.group_id) for r in result.rows] == [
        (a.rollout_id, 1.0, "g-a"),
        (a.rollout_id, 1.0, "g-a"),
        (b.rollout_id, 0.0, "t2"),
    ]
    metrics = result.metrics()
    assert metrics["adapter/rollouts"] == 3.0
    assert metrics["adapter/rows"] == 3.0
    assert metrics["adapter/no_reward"] == 1.0
    assert metrics["adapter/llm_calls"] == 3.0
    assert metrics["adapter/forked_rows"] == 1.0
    assert all(name.startswith("adapter/") for name in metrics)


def test_tag_selection_trains_only_tagged_calls_and_masks_the_others_tokens() -> None:
    ro = make_rollout()
    solver1 = llm_span(ro, 0, [1, 2], [10], [-0.1], tag="solver")
    judge = llm_span(ro, 1, [1, 2, 10, 3], [40, 41], [-0.9, -0.9], tag="judge")
    solver2 = llm_span(ro, 2, [1, 2, 10, 3, 40, 41, 4], [11], [-0.2], tag="solver")
    result = TrajectoryAdapter(tag="solver").adapt(ro, [solver1, judge, solver2])

    assert result.skipped_calls == 1 and result.llm_calls == 3
    (row,) = result.rows
    assert row.completion_ids == [10, 3, 40, 41, 4, 11]
    assert row.env_mask == [1, 0, 0, 0, 0, 1]
    assert row.logprobs == [-0.1, 0.0, 0.0, 0.0, 0.0, -0.2]


def test_tag_that_matches_no_call_leaves_an_empty_rollout() -> None:
    ro = make_rollout()
    result = TrajectoryAdapter(tag="solver").adapt(ro, [llm_span(ro, 0, [1], [2], tag="judge")])
    assert result.rows == []
    assert result.skipped_calls == 1 and result.empty_rollouts == 1


def test_only_the_final_attempts_spans_are_used() -> None:
    ro = make_rollout(attempts=2)
    stale = llm_span(ro, 0, [1, 2], [66, 67], attempt=1)
    fresh = llm_span(ro, 0, [1, 2], [10], attempt=2)
    result = TrajectoryAdapter().adapt(ro, [stale, tool_span(ro, 1, attempt=1), fresh])

    assert [r.completion_ids for r in result.rows] == [[10]]
    assert result.earlier_attempt_calls == 1 and result.llm_calls == 1


def test_row_policy_version_is_the_oldest_of_its_calls() -> None:
    ro = make_rollout()
    call1 = llm_span(ro, 0, [1], [2], version=3)
    call2 = llm_span(ro, 1, [1, 2, 5], [6], version=4)
    (row,) = TrajectoryAdapter().adapt(ro, [call1, call2]).rows
    assert row.policy_version == 3


def test_misaligned_logprobs_are_an_error_naming_the_span() -> None:
    ro = make_rollout()
    bad = llm_span(ro, 0, [1], [2, 3], [-0.1])
    with pytest.raises(AdapterError, match=f"{bad.span_id}.*1 logprobs for 2 completion_ids"):
        TrajectoryAdapter().adapt(ro, [bad])


def test_missing_token_field_is_an_error_naming_it() -> None:
    ro = make_rollout()
    span = llm_span(ro, 0, [1], [2])
    del span.attributes["prompt_ids"]
    with pytest.raises(AdapterError, match="'prompt_ids'"):
        TrajectoryAdapter().adapt(ro, [span])


def test_span_of_another_rollout_is_an_error() -> None:
    ro, other = make_rollout(), make_rollout()
    with pytest.raises(AdapterError, match=other.rollout_id):
        TrajectoryAdapter().adapt(ro, [llm_span(other, 0, [1], [2])])


@st.composite
def conversations(draw: st.DrawFn) -> list[tuple[list[int], list[int]]]:
    """Prefix-consistent multi-turn calls: each prompt = previous prompt + completion + env tokens."""
    tokens = st.lists(st.integers(0, 50_000), min_size=0, max_size=6)
    prompt = draw(st.lists(st.integers(0, 50_000), min_size=1, max_size=6))
    calls = []
    for _ in range(draw(st.integers(1, 5))):
        completion = draw(tokens.filter(bool))
        calls.append((prompt, completion))
        prompt = prompt + completion + draw(tokens)
    return calls


@settings(max_examples=60, deadline=None)
@given(conversations())
def test_a_consistent_conversation_is_one_row_whose_policy_tokens_are_the_completions(calls) -> None:
    ro = make_rollout()
    spans = [
        llm_span(ro, i, p, c, [-(i + 1) / 10 - j / 1000 for j in range(len(c))])
        for i, (p, c) in enumerate(calls)
    ]
    result = TrajectoryAdapter().adapt(ro, spans)

    (row,) = result.rows
    assert_valid(row)
    last_prompt, last_completion = calls[-1]
    assert row.prompt_ids + row.completion_ids == last_prompt + last_completion
    sampled = [t for t, m in zip(row.completion_ids, row.env_mask, strict=True) if m]
    assert sampled == [t for _, c in calls for t in c]
    policy_logprobs = [lp for lp, m in zip(row.logprobs, row.env_mask, strict=True) if m]
    assert policy_logprobs == [lp for s in spans for lp in s.attributes["logprobs"]]
    assert all(lp == 0.0 for lp, m in zip(row.logprobs, row.env_mask, strict=True) if not m)


def test_the_trajectory_core_imports_no_heavy_library() -> None:
    """Decision 3 of the design: adapters and advantages run (and are tested) without torch, TRL, transformers."""
    code = "import sys, rltrain.adapters; print(sorted({'torch', 'trl', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

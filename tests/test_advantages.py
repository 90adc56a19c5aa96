"""Advantages against hand computations: GRPO scaling modes, zero-std groups, collapse, GAE, whitening, and
PPO's rewards on tokens (final or per turn) and batch estimate."""

from __future__ import annotations

import math

import pytest
from test_trajectories import llm_span, make_rollout, tool_span

from rltrain.adapters.advantages import (
    UNPARSEABLE,
    answer_distribution,
    collapse_warning,
    gae,
    group_advantages,
    ppo_advantages,
    token_rewards,
    whiten,
)
from rltrain.adapters.trajectories import TrajectoryAdapter
from rltrain.types import Span, SpanKind

# group a: [1, 0, 0] (mean 1/3, sample std sqrt(1/3)); group b: [1, 1] (std 0); group c: [1] (alone)
REWARDS = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0]
GROUPS = ["a", "a", "a", "b", "b", "c"]
STD_A = math.sqrt(1 / 3)
STD_BATCH = math.sqrt(4 / 15)  # batch mean 2/3; squared deviations sum to 4/3; / (6 - 1)
CENTRED = [2 / 3, -1 / 3, -1 / 3, 0.0, 0.0, 0.0]


def test_group_scaling_divides_by_each_groups_std() -> None:
    result = group_advantages(REWARDS, GROUPS, scale_rewards="group")
    expected = [2 / 3 / (STD_A + 1e-4), -1 / 3 / (STD_A + 1e-4), -1 / 3 / (STD_A + 1e-4), 0.0, 0.0, 0.0]
    assert result.advantages == pytest.approx(expected)
    assert result.groups["a"].mean == pytest.approx(1 / 3)
    assert result.groups["a"].std == pytest.approx(STD_A)
    assert (result.groups["a"].count, result.groups["b"].count, result.groups["c"].count) == (3, 2, 1)


def test_batch_scaling_centres_per_group_and_divides_by_the_batch_std() -> None:
    result = group_advantages(REWARDS, GROUPS, scale_rewards="batch")
    assert result.advantages == pytest.approx([c / (STD_BATCH + 1e-4) for c in CENTRED])


def test_no_scaling_only_centres() -> None:
    result = group_advantages(REWARDS, GROUPS, scale_rewards="none")
    assert result.advantages == pytest.approx(CENTRED)


def test_eps_is_used() -> None:
    result = group_advantages([1.0, 0.0], ["g", "g"], eps=0.5)
    std = math.sqrt(0.5)
    assert result.advantages == pytest.approx([0.5 / (std + 0.5), -0.5 / (std + 0.5)])


def test_zero_std_groups_are_reported() -> None:
    result = group_advantages(REWARDS, GROUPS)
    assert result.frac_zero_std_groups == pytest.approx(2 / 3)  # b (all equal) and c (alone)
    assert result.groups["b"].zero_std and result.groups["c"].zero_std and not result.groups["a"].zero_std
    assert not result.no_signal
    assert result.metrics() == {"train/frac_zero_std_groups": pytest.approx(2 / 3)}


def test_a_batch_where_every_group_agrees_has_no_signal() -> None:
    result = group_advantages([0.0, 0.0, 1.0, 1.0], ["a", "a", "b", "b"])
    assert result.no_signal
    assert result.frac_zero_std_groups == 1.0
    assert result.advantages == [0.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    ("rewards", "groups", "mode", "message"),
    [
        ([1.0], ["a", "b"], "group", "same length"),
        ([], [], "group", "at least one reward"),
        ([1.0], ["a"], "median", "scale_rewards"),
        ([1.0, float("nan")], ["a", "a"], "group", "reward 1"),
    ],
)
def test_bad_inputs_are_errors(rewards, groups, mode, message) -> None:
    with pytest.raises(ValueError, match=message):
        group_advantages(rewards, groups, scale_rewards=mode)


def test_answer_distribution_counts_unparseable_and_sums_to_one() -> None:
    dist = answer_distribution(["Nova", "No Room", "Nova", None])
    assert dist == {"Nova": 0.5, "No Room": 0.25, UNPARSEABLE: 0.25}
    assert list(dist) == ["Nova", "No Room", UNPARSEABLE]  # most frequent first
    assert answer_distribution([]) == {}


def test_collapse_warning_fires_on_a_collapsed_batch_with_advice() -> None:
    dist = answer_distribution(["No Room"] * 19 + ["Nova"])
    warning = collapse_warning(dist, threshold=0.9)
    assert warning is not None
    assert "'No Room'" in warning and "95%" in warning
    for advice in ("warm-start", "learning rate", "temperature"):
        assert advice in warning


def test_collapse_warning_fires_at_the_threshold() -> None:
    assert collapse_warning({"A": 0.9, "B": 0.1}, threshold=0.9) is not None


def test_collapse_warning_is_silent_on_a_healthy_batch() -> None:
    assert collapse_warning(answer_distribution(["A", "B", "C", "A", "B", "C", "A", "D"])) is None


def test_unparseable_output_is_not_a_collapse() -> None:
    assert collapse_warning(answer_distribution([None] * 19 + ["A"])) is None
    assert collapse_warning({}) is None


def test_collapse_threshold_must_be_a_fraction() -> None:
    with pytest.raises(ValueError, match="threshold"):
        collapse_warning({"A": 1.0}, threshold=90)


def test_gae_skips_tool_tokens_and_links_consecutive_policy_tokens() -> None:
    # tokens: policy, tool, tool, policy, policy; tool-token values are nonsense and must not matter
    rewards = [0.0, 0.0, 0.0, 0.0, 1.0]
    values = [0.5, 9.0, 9.0, 0.6, 0.8]
    mask = [1, 0, 0, 1, 1]
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # t=4: delta = 1 - 0.8 = 0.2                     A = 0.2
    # t=3: delta = 0.9*0.8 - 0.6 = 0.12              A = 0.12 + 0.72*0.2 = 0.264
    # t=0: delta = 0.9*0.6 - 0.5 = 0.04 (next = t3)  A = 0.04 + 0.72*0.264 = 0.23008
    assert advantages == pytest.approx([0.23008, 0.0, 0.0, 0.264, 0.2])
    assert returns == pytest.approx([0.73008, 0.0, 0.0, 0.864, 1.0])


def test_gae_with_gamma_and_lambda_one_is_reward_to_go_minus_value() -> None:
    advantages, returns = gae([0.0, 0.5, 0.0, 1.0], [0.1, 0.2, 0.3, 0.4], [1, 1, 0, 1], gamma=1.0, lam=1.0)
    assert returns == pytest.approx([1.5, 1.5, 0.0, 1.0])
    assert advantages == pytest.approx([1.4, 1.3, 0.0, 0.6])


def test_gae_rejects_a_reward_on_a_tool_token() -> None:
    with pytest.raises(ValueError, match="token 1, which has mask 0"):
        gae([0.0, 1.0], [0.0, 0.0], [1, 0])


def test_gae_rejects_misaligned_inputs() -> None:
    with pytest.raises(ValueError, match="same length"):
        gae([0.0], [0.0, 0.0], [1, 1])


def test_whiten_uses_masked_entries_only() -> None:
    # kept: 1, 3, 5 -> mean 3, unbiased variance 4, std 2; the 100 is masked out
    assert whiten([1.0, 100.0, 3.0, 5.0], [1, 0, 1, 1]) == pytest.approx([-1.0, 0.0, 0.0, 1.0], abs=1e-6)
    assert whiten([1.0, 100.0, 3.0, 5.0], [1, 0, 1, 1], shift_mean=False) == pytest.approx(
        [2.0, 0.0, 3.0, 4.0], abs=1e-6
    )


def test_whiten_needs_two_entries() -> None:
    with pytest.raises(ValueError, match="at least two"):
        whiten([1.0, 2.0], [1, 0])


# -- PPO: rewards on tokens, and the batch estimate ------------------------------------------------------------
# A two-turn rollout: turn 1 completes [10, 11], a tool answers [50, 51], turn 2 completes [12, 13].
# Its row: completion [10, 11, 50, 51, 12, 13], env_mask [1, 1, 0, 0, 1, 1].
TURN_1 = ([1, 2], [10, 11])
TURN_2 = ([1, 2, 10, 11, 50, 51], [12, 13])


def two_turn_row(spans_after: list[tuple[str, float]], rollout_reward: float):
    """The row of a two-turn rollout and its spans; ``spans_after`` lists ("turn1" | "turn2" | "start", reward)
    for rewards emitted after that point."""
    ro = make_rollout(reward=rollout_reward)
    emitted = {key: [v for k, v in spans_after if k == key] for key in ("start", "turn1", "turn2")}
    spans, seq = [], 0

    def add(span):
        nonlocal seq
        spans.append(span.model_copy(update={"sequence": seq}))
        seq += 1

    for value in emitted["start"]:
        add(reward_span(ro, value))
    add(llm_span(ro, 0, *TURN_1))
    add(tool_span(ro, 0))
    for value in emitted["turn1"]:
        add(reward_span(ro, value))
    add(llm_span(ro, 0, *TURN_2))
    for value in emitted["turn2"]:
        add(reward_span(ro, value))
    [row] = TrajectoryAdapter().adapt(ro, spans).rows
    assert row.env_mask == [1, 1, 0, 0, 1, 1]
    return row, spans


def reward_span(rollout, value: float) -> Span:
    return Span(rollout_id=rollout.rollout_id, kind=SpanKind.REWARD, name="reward", attributes={"value": value})


def test_final_placement_puts_the_rollout_reward_on_the_last_policy_token() -> None:
    row, spans = two_turn_row([("turn1", 0.2), ("turn2", 0.5)], rollout_reward=0.5)
    assert token_rewards(row, spans) == [0.0, 0.0, 0.0, 0.0, 0.0, 0.5]


def test_per_turn_placement_credits_each_emitted_reward_to_the_turn_before_it() -> None:
    # the agent returned nothing: its reward is its last emitted one (0.5), which must not count twice
    row, spans = two_turn_row([("turn1", 0.2), ("turn2", 0.5)], rollout_reward=0.5)
    assert token_rewards(row, spans, per_turn=True) == [0.0, 0.2, 0.0, 0.0, 0.0, 0.5]


def test_per_turn_placement_adds_the_returned_reward_when_no_reward_followed_the_last_turn() -> None:
    row, spans = two_turn_row([("start", 0.1), ("turn1", 0.2)], rollout_reward=1.0)
    assert token_rewards(row, spans, per_turn=True) == pytest.approx([0.1, 0.2, 0.0, 0.0, 0.0, 1.0])


def test_per_turn_placement_keeps_the_rewards_of_cut_turns_on_a_truncated_row() -> None:
    row, spans = two_turn_row([("turn1", 0.2), ("turn2", 0.5)], rollout_reward=0.5)
    cut = row.model_copy(update={"completion_ids": row.completion_ids[:4], "logprobs": row.logprobs[:4],
                                 "env_mask": row.env_mask[:4]})
    assert token_rewards(cut, spans, per_turn=True) == pytest.approx([0.0, 0.7, 0.0, 0.0])
    assert token_rewards(cut, spans) == [0.0, 0.5, 0.0, 0.0]


def test_per_turn_placement_ignores_calls_of_another_row() -> None:
    row, spans = two_turn_row([("turn2", 0.5)], rollout_reward=0.5)
    ro_id = spans[0].rollout_id
    fork = llm_span(make_rollout(), 0, [9, 9], [8]).model_copy(update={"rollout_id": ro_id, "sequence": 1})
    late = reward_span(spans[0], 0.3).model_copy(update={"rollout_id": ro_id, "sequence": 2})
    # order: turn 1, fork, reward 0.3 (credited to turn 1, the row's latest turn), tool, turn 2, reward 0.5
    reordered = [spans[0], fork, late, *spans[1:]]
    reordered = [s.model_copy(update={"sequence": i}) for i, s in enumerate(reordered)]
    assert token_rewards(row, reordered, per_turn=True) == pytest.approx([0.0, 0.3, 0.0, 0.0, 0.0, 0.5])


def test_per_turn_placement_rejects_a_non_finite_emitted_reward() -> None:
    row, spans = two_turn_row([("turn1", float("nan"))], rollout_reward=1.0)
    with pytest.raises(ValueError, match="must be finite"):
        token_rewards(row, spans, per_turn=True)


def flat(rows: list[list[float]]) -> list[float]:
    return [x for row in rows for x in row]


def test_ppo_advantages_run_gae_per_row_and_whiten_over_the_batch() -> None:
    # row a: policy, tool, policy (reward 1 at the end); row b: policy, policy, padding (reward 0)
    rewards = [[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]
    values = [[0.5, 7.0, 0.5], [0.2, 0.2, 0.0]]
    masks = [[1, 0, 1], [1, 1, 0]]
    raw = ppo_advantages(rewards, values, masks, gamma=1.0, lam=1.0, whiten_advantages=False)
    # a: t2 delta 0.5 -> A 0.5, R 1; t0 delta 0 + 0.5 - 0.5 = 0 -> A 0.5, R 1.  b: t1 A -0.2, R 0; t0 A -0.2, R 0
    assert flat(raw.advantages) == pytest.approx([0.5, 0.0, 0.5, -0.2, -0.2, 0.0])
    assert flat(raw.returns) == pytest.approx([1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    std = math.sqrt(4 * 0.35**2 / 3)
    assert raw.metrics == pytest.approx({
        "train/advantage_mean": 0.15, "train/advantage_std": std, "train/value_mean": 0.35,
        "train/return_mean": 0.5,
        "train/explained_variance": 1 - 0.1225 / 0.25,  # Var(R - V) = Var([.5, .5, -.2, -.2]); Var(R) = .25
    })
    white = ppo_advantages(rewards, values, masks, gamma=1.0, lam=1.0)
    z = 0.35 / math.sqrt(std**2 + 1e-8)
    assert [len(row) for row in white.advantages] == [3, 3]
    assert flat(white.advantages) == pytest.approx([z, 0.0, z, -z, -z, 0.0])
    assert white.returns == raw.returns and white.metrics == raw.metrics


def test_ppo_advantages_leave_a_batch_of_one_policy_token_unwhitened() -> None:
    result = ppo_advantages([[1.0, 0.0]], [[0.25, 0.0]], [[1, 0]], gamma=1.0, lam=0.95)
    assert result.advantages == [[0.75, 0.0]]
    assert math.isnan(result.metrics["train/explained_variance"])  # a single return has no variance

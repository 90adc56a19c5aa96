"""Advantages against hand computations: GRPO scaling modes, zero-std groups, collapse, GAE, whitening."""

from __future__ import annotations

import math

import pytest

from rltrain.adapters.advantages import (
    UNPARSEABLE,
    answer_distribution,
    collapse_warning,
    gae,
    group_advantages,
    whiten,
)

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

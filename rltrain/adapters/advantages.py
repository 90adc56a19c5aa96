"""Advantages and the health signals around them, in plain Python (no torch), so they are unit-tested alone.

* :func:`group_advantages`: GRPO's group-relative advantage, with TRL's ``scale_rewards`` semantics, and the
  share of groups that carry no signal (every member got the same reward).
* :func:`answer_distribution` / :func:`collapse_warning`: the answer mix of a batch, because a policy that
  collapses onto one answer (the majority class) can hold a deceptively good accuracy while learning nothing.
* PPO, per token: :func:`token_rewards` places a row's reward(s) on its policy tokens, :func:`gae` estimates
  advantages and returns over one row's policy tokens (tool/observation tokens, mask 0, skipped), :func:`whiten`
  normalises them over a batch, and :func:`ppo_advantages` does all three for a batch with its health metrics.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from dataclasses import dataclass
from typing import Literal

from rltrain.adapters.trajectories import span_order
from rltrain.types import Span, SpanKind, Trajectory

ScaleRewards = Literal["group", "batch", "none"]
UNPARSEABLE = "<unparseable>"
"""The key under which :func:`answer_distribution` counts answers that could not be parsed (``None``)."""


@dataclass(frozen=True)
class GroupStats:
    """Reward statistics of one group: ``std`` is the sample standard deviation (Bessel-corrected, as TRL's
    ``nanstd``), 0.0 for a group of one."""

    count: int
    mean: float
    std: float

    @property
    def zero_std(self) -> bool:
        """Every member got the same reward: the group gives no gradient under GRPO."""
        return math.isclose(self.std, 0.0, abs_tol=1e-8)


@dataclass(frozen=True)
class AdvantageResult:
    """One advantage per input reward, the per-group statistics, and whether the batch has any signal."""

    advantages: list[float]
    groups: dict[str, GroupStats]
    frac_zero_std_groups: float
    no_signal: bool

    def metrics(self) -> dict[str, float]:
        return {"train/frac_zero_std_groups": self.frac_zero_std_groups}


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and Bessel-corrected standard deviation; the std of fewer than two values is 0.0."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def group_advantages(
    rewards: list[float],
    group_ids: list[str],
    scale_rewards: ScaleRewards = "group",
    eps: float = 1e-4,
) -> AdvantageResult:
    """GRPO advantages, as ``trl.GRPOTrainer`` computes them: ``reward - mean(reward of its group)``, divided
    by ``std + eps`` where the std is the group's (``"group"``), the whole batch's (``"batch"``, the
    recommendation of "Understanding R1-Zero-like training" to avoid a difficulty bias) or not at all
    (``"none"``, centring only).

    Groups may differ in size (failed rollouts leave holes). Pass one entry per *rollout*, not per row: a
    rollout that forked into several rows would otherwise weigh several times in its group's mean; give all
    rows of a rollout that rollout's advantage.
    """
    if len(rewards) != len(group_ids):
        raise ValueError(
            f"rewards ({len(rewards)}) and group_ids ({len(group_ids)}) must have the same length"
        )
    if not rewards:
        raise ValueError("group_advantages needs at least one reward; got none (did every rollout fail?)")
    if scale_rewards not in ("group", "batch", "none"):
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}")
    for i, r in enumerate(rewards):
        if not math.isfinite(r):
            raise ValueError(f"reward {i} (group {group_ids[i]!r}) is {r}; rewards must be finite numbers")

    members: dict[str, list[float]] = {}
    for r, g in zip(rewards, group_ids, strict=True):
        members.setdefault(g, []).append(r)
    groups = {g: GroupStats(len(rs), *_mean_std(rs)) for g, rs in members.items()}
    batch_std = _mean_std(rewards)[1]

    advantages: list[float] = []
    for r, g in zip(rewards, group_ids, strict=True):
        stats = groups[g]
        centred = r - stats.mean
        if scale_rewards == "group":
            centred /= stats.std + eps
        elif scale_rewards == "batch":
            centred /= batch_std + eps
        advantages.append(centred)

    zero = sum(1 for s in groups.values() if s.zero_std)
    return AdvantageResult(
        advantages=advantages,
        groups=groups,
        frac_zero_std_groups=zero / len(groups),
        no_signal=zero == len(groups),
    )


def answer_distribution(answers: list[str | None]) -> dict[str, float]:
    """Share of each answer in the batch, most frequent first; unparseable answers (``None``) are counted
    under :data:`UNPARSEABLE` so that the shares sum to 1 and a model that stops answering is visible."""
    if not answers:
        return {}
    counts = Counter(UNPARSEABLE if a is None else a for a in answers)
    n = len(answers)
    return {answer: c / n for answer, c in counts.most_common()}


def collapse_warning(dist: dict[str, float], threshold: float = 0.9) -> str | None:
    """An actionable warning when one *parsed* answer takes at least ``threshold`` of the batch, else None.

    Unparseable output is not an answer the policy collapsed onto (it is a format failure, visible in the
    distribution itself), so it never triggers this warning; shares stay relative to the whole batch, so a
    batch that is mostly unparseable does not warn about its few parsed answers either.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"collapse threshold must be in (0, 1], got {threshold}")
    parsed = {a: share for a, share in dist.items() if a != UNPARSEABLE}
    if not parsed:
        return None
    answer, share = max(parsed.items(), key=lambda item: item[1])
    if share < threshold:
        return None
    return (
        f"answer {answer!r} is {share:.0%} of the batch (threshold {threshold:.0%}): the policy has likely "
        f"collapsed onto one answer. Compare accuracy with always answering {answer!r}; to recover, warm-start "
        "the policy (APO first, or a short supervised stage on solver-labelled tasks), lower the learning rate, "
        "or raise the sampling temperature so that groups keep a reward spread."
    )


def gae(
    rewards_per_token: list[float],
    values_per_token: list[float],
    mask: list[int],
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[list[float], list[float]]:
    """Generalised advantage estimation over one row's completion tokens; returns ``(advantages, returns)``.

    Only policy tokens (mask 1) are steps of the MDP: the recursion links each policy token to the *next
    policy token*, skipping the tool/observation tokens in between (they are the environment's transition,
    not actions), and the value after the last policy token is 0 (the episode ends). With ``t`` and ``t'``
    consecutive policy tokens::

        delta_t = r_t + gamma * V_t' - V_t        A_t = delta_t + gamma * lam * A_t'        R_t = A_t + V_t

    Mask-0 tokens get advantage and return 0.0. A non-zero reward on a mask-0 token is an error rather than
    being dropped or moved silently: put rewards (and per-token KL penalties) on policy tokens.
    """
    n = len(mask)
    if len(rewards_per_token) != n or len(values_per_token) != n:
        raise ValueError(
            f"gae: rewards ({len(rewards_per_token)}), values ({len(values_per_token)}) and mask ({n}) "
            "must have the same length"
        )
    advantages = [0.0] * n
    returns = [0.0] * n
    next_value = 0.0
    next_advantage = 0.0
    for t in range(n - 1, -1, -1):
        if not mask[t]:
            if rewards_per_token[t] != 0.0:
                raise ValueError(
                    f"gae: reward {rewards_per_token[t]} on token {t}, which has mask 0 (a tool/observation "
                    "token); rewards must sit on policy tokens"
                )
            continue
        value = values_per_token[t]
        delta = rewards_per_token[t] + gamma * next_value - value
        next_advantage = delta + gamma * lam * next_advantage
        next_value = value
        advantages[t] = next_advantage
        returns[t] = next_advantage + value
    return advantages, returns


def whiten(values: list[float], mask: list[int], shift_mean: bool = True, eps: float = 1e-8) -> list[float]:
    """Normalise the mask-1 entries to zero mean and unit variance, as the classic PPO ``masked_whiten`` does
    (unbiased variance, ``eps`` inside the square root); mask-0 entries become 0.0. With
    ``shift_mean=False`` the mean is added back (scale only).

    Pass a whole batch flattened (PPO whitens advantages across the batch, not per row).
    """
    if len(values) != len(mask):
        raise ValueError(f"whiten: values ({len(values)}) and mask ({len(mask)}) must have the same length")
    kept = [v for v, m in zip(values, mask, strict=True) if m]
    if len(kept) < 2:
        raise ValueError(f"whiten needs at least two mask-1 entries to estimate a variance, got {len(kept)}")
    mean = sum(kept) / len(kept)
    var = sum((v - mean) ** 2 for v in kept) / (len(kept) - 1)
    scale = 1.0 / math.sqrt(var + eps)
    offset = 0.0 if shift_mean else mean
    return [(v - mean) * scale + offset if m else 0.0 for v, m in zip(values, mask, strict=True)]


def token_rewards(row: Trajectory, spans: list[Span], per_turn: bool = False) -> list[float]:
    """One reward per completion token of ``row``: the value targets PPO's GAE discounts.

    By default the rollout's reward sits on the row's last policy token (the episode's end) and every other
    token gets 0.0. With ``per_turn``, an agent that emitted rewards during the rollout (``emit_reward``, one per
    turn, say) gets each of them on the last policy token the row had produced when it was emitted (the first
    policy token when none had been), so earlier turns are credited where they ended; the rollout's reward is
    then added on the last policy token only when no emitted reward followed the row's last turn (otherwise it
    would be counted twice: an agent's reward defaults to its last emitted one). ``spans`` are the rollout's
    spans of the attempt the row was built from; llm calls of other rows (forks) are recognised and ignored.

    A row cut at ``max_completion_length`` keeps the rewards of its cut turns on its last policy token, so the
    return of the row is unchanged. A row without policy tokens gets no reward (it trains nothing).
    """
    n = len(row.env_mask)
    policy = [i for i, m in enumerate(row.env_mask) if m]
    rewards = [0.0] * n
    if not policy:
        return rewards
    if not per_turn:
        rewards[policy[-1]] = row.reward
        return rewards
    turn_end: int | None = None
    rewarded_since_turn = False
    for span in sorted(spans, key=span_order):
        if span.kind is SpanKind.LLM:
            end = _turn_end(row, span)
            if end is not None:
                turn_end, rewarded_since_turn = end, False
        elif span.kind is SpanKind.REWARD:
            value = float(span.attributes.get("value", math.nan))
            if not math.isfinite(value):
                raise ValueError(
                    f"rollout {row.rollout_id}: reward span {span.span_id} has value {value}; emitted rewards "
                    "must be finite numbers"
                )
            k = 0 if turn_end is None else max(bisect.bisect_right(policy, turn_end) - 1, 0)
            rewards[policy[k]] += value
            rewarded_since_turn = True
    if not rewarded_since_turn:
        rewards[policy[-1]] += row.reward
    return rewards


def _turn_end(row: Trajectory, span: Span) -> int | None:
    """Index in ``row.completion_ids`` of the last token of llm call ``span`` (clamped to a truncated row's
    end), or ``None`` when the call is not part of this row. Rows are built by concatenation (the adapter's
    rule), so a call belongs to the row when its prompt + completion is a prefix of the row's sequence."""
    prompt: list[int] = span.attributes.get("prompt_ids", [])
    completion: list[int] = span.attributes.get("completion_ids", [])
    head, n = len(row.prompt_ids), len(row.completion_ids)
    start = len(prompt) - head
    if start < 0 or prompt[:head] != row.prompt_ids:
        return None
    seen = min(start, n)
    if prompt[head:head + seen] != row.completion_ids[:seen]:
        return None
    stop = min(start + len(completion), n)
    if start < n and completion[: stop - start] != row.completion_ids[start:stop]:
        return None
    return stop - 1


@dataclass(frozen=True)
class PPOAdvantages:
    """Per-token advantages and returns of a batch of rows (0.0 on mask-0 tokens), and the step's metrics:

    * ``train/advantage_mean`` / ``train/advantage_std``: of the GAE advantages before whitening (after it they
      are 0 and 1 by construction);
    * ``train/value_mean`` / ``train/return_mean``: what the critic predicted and what it is trained towards;
    * ``train/explained_variance``: ``1 - Var(return - value) / Var(return)`` over policy tokens; 1 is a perfect
      critic, 0 one no better than a constant, negative a harmful one; NaN when every return is equal.
    """

    advantages: list[list[float]]
    returns: list[list[float]]
    metrics: dict[str, float]


def ppo_advantages(
    rewards: list[list[float]],
    values: list[list[float]],
    masks: list[list[int]],
    gamma: float,
    lam: float,
    whiten_advantages: bool = True,
) -> PPOAdvantages:
    """GAE (:func:`gae`) over each row, then, with ``whiten_advantages``, whitening over every policy token of
    the batch (:func:`whiten`; skipped when the batch has fewer than two policy tokens, which carry no variance
    to normalise). Rows are given as equally long or ragged lists; each row's three lists align."""
    if not len(rewards) == len(values) == len(masks):
        raise ValueError(
            f"ppo_advantages: rewards ({len(rewards)}), values ({len(values)}) and masks ({len(masks)}) must have "
            "one entry per row"
        )
    advantages: list[list[float]] = []
    returns: list[list[float]] = []
    for r, v, m in zip(rewards, values, masks, strict=True):
        a, ret = gae(r, v, m, gamma=gamma, lam=lam)
        advantages.append(a)
        returns.append(ret)
    flat_mask = [m for row in masks for m in row]
    flat_adv = [a for row in advantages for a in row]
    kept = [i for i, m in enumerate(flat_mask) if m]
    raw = [flat_adv[i] for i in kept]
    flat_ret = [x for row in returns for x in row]
    flat_val = [x for row in values for x in row]
    ret = [flat_ret[i] for i in kept]
    val = [flat_val[i] for i in kept]
    metrics = {
        "train/advantage_mean": _mean(raw),
        "train/advantage_std": _mean_std(raw)[1] if raw else 0.0,
        "train/value_mean": _mean(val),
        "train/return_mean": _mean(ret),
        "train/explained_variance": _explained_variance(val, ret),
    }
    if whiten_advantages and len(kept) >= 2:
        white = whiten(flat_adv, flat_mask)
        advantages, offset = [], 0
        for row in masks:
            advantages.append(white[offset:offset + len(row)])
            offset += len(row)
    return PPOAdvantages(advantages=advantages, returns=returns, metrics=metrics)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _explained_variance(predicted: list[float], target: list[float]) -> float:
    """``1 - Var(target - predicted) / Var(target)`` (population variances); NaN when ``target`` is constant."""
    if not target:
        return math.nan
    mean_t = _mean(target)
    var_t = _mean([(t - mean_t) ** 2 for t in target])
    if var_t == 0.0:
        return math.nan
    residual = [t - p for p, t in zip(predicted, target, strict=True)]
    mean_r = _mean(residual)
    return 1.0 - _mean([(r - mean_r) ** 2 for r in residual]) / var_t

"""Spans -> token-level training rows (:class:`~rltrain.types.Trajectory`).

The gateway records, for every chat completion, the exact token ids the engine saw (``prompt_ids``) and
sampled (``completion_ids``, with one logprob each). When an agent extends its conversation, the next call's
``prompt_ids`` start with the previous call's ``prompt_ids + completion_ids`` verbatim (decision 1 of the
design). So a multi-turn rollout is rebuilt here by *concatenation only*, never by re-tokenising text:

* a row starts from one call: ``prompt_ids`` = its prompt, ``completion_ids`` = its completion (mask 1,
  logprobs as sampled);
* a later call whose prompt starts with a row's whole sequence extends that row: the tokens in between (tool
  results, the next user turn, template tokens, or the output of a call that was not selected for training)
  are appended with mask 0 and logprob 0.0, then its completion with mask 1;
* a call that extends no row (the agent rewrote or truncated its history, or it is another of ``n > 1``
  choices of the same prompt) starts a new row, counted in ``adapter/forked_rows`` and, by the cause the gateway
  recorded (``fork_cause``: tools differ, system prompt differs, template re-renders history, history
  rewritten), in ``adapter/fork_causes/<cause>``; ``another_choice`` for a second choice of one prompt,
  ``new_conversation`` for a call that shares nothing with the rollout's earlier calls.

Nothing is dropped silently: every llm span of the final attempt either lands in a row or is counted
(``skipped_calls`` when its tag is not trained, ``earlier_attempt_calls`` for spans of retried attempts), and
every rollout that gives no row is counted (``no_reward``, ``empty_rollouts``).

This module is on the hot path of every training step (a benchmark holds it to >= 11,700 rollouts/s for
five calls of up to 800 tokens), so it trusts spans as built (they were validated when made) and builds
trajectories with ``model_construct``: their alignment is guaranteed by construction here and checked in
the tests, not re-validated per row.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from rltrain.types import Rollout, Span, SpanKind, Trajectory


class AdapterError(ValueError):
    """Spans that cannot be turned into rows: a span of another rollout, or an llm span whose token fields are
    missing or misaligned. The message names the span and the field."""


@dataclass
class AdapterResult:
    """The rows built from some rollouts and the counters that explain what became of every rollout and call.

    ``rollouts``: rollouts seen; ``no_reward``: rollouts skipped because their reward is ``None`` (failed or
    ungraded); ``empty_rollouts``: rollouts with a reward but no trained llm call; ``llm_calls``: llm spans of
    final attempts (trained ones are ``llm_calls - skipped_calls``); ``skipped_calls``: llm calls whose tag is
    not the trained one; ``earlier_attempt_calls``: llm spans of retried attempts, ignored; ``forked_rows``:
    rows started because a call extended no existing row; ``fork_causes``: those rows by cause; ``policy_tokens`` / ``env_tokens``: completion tokens
    with mask 1 / mask 0.
    """

    rows: list[Trajectory] = field(default_factory=list)
    rollouts: int = 0
    no_reward: int = 0
    empty_rollouts: int = 0
    llm_calls: int = 0
    skipped_calls: int = 0
    earlier_attempt_calls: int = 0
    forked_rows: int = 0
    fork_causes: dict[str, int] = field(default_factory=dict)
    policy_tokens: int = 0
    env_tokens: int = 0

    def metrics(self) -> dict[str, float]:
        """The counters under their metric names (``adapter/<counter>``), plus ``adapter/rows``."""
        counters = {
            "rows": len(self.rows),
            "rollouts": self.rollouts,
            "no_reward": self.no_reward,
            "empty_rollouts": self.empty_rollouts,
            "llm_calls": self.llm_calls,
            "skipped_calls": self.skipped_calls,
            "earlier_attempt_calls": self.earlier_attempt_calls,
            "forked_rows": self.forked_rows,
            "policy_tokens": self.policy_tokens,
            "env_tokens": self.env_tokens,
        }
        metrics = {f"adapter/{name}": float(value) for name, value in counters.items()}
        metrics.update({f"adapter/fork_causes/{cause}": float(n) for cause, n in sorted(self.fork_causes.items())})
        return metrics


class _OpenRow:
    """A row being built. Its full sequence is ``prompt + completion``; ``prompt_len``/``seq_len`` are cached
    so the prefix test of the next call is two slice comparisons and no concatenation."""

    __slots__ = ("completion", "logprobs", "mask", "policy_version", "prompt", "prompt_len", "seq_len")

    def __init__(self, prompt: list[int], completion: list[int], logprobs: list[float], version: int) -> None:
        self.prompt = list(prompt)
        self.completion = list(completion)
        self.logprobs = list(logprobs)
        self.mask = [1] * len(completion)
        self.prompt_len = len(prompt)
        self.seq_len = self.prompt_len + len(completion)
        self.policy_version = version

    def is_prefix_of(self, prompt_ids: list[int]) -> bool:
        """Whether ``prompt_ids`` starts with this row's whole sequence (the completion part, most likely to
        differ, is compared first)."""
        n = self.seq_len
        return (
            len(prompt_ids) >= n
            and prompt_ids[self.prompt_len : n] == self.completion
            and prompt_ids[: self.prompt_len] == self.prompt
        )

    def extend(
        self, prompt_ids: list[int], completion: list[int], logprobs: list[float], version: int
    ) -> int:
        """Append the tokens between this row's end and the call's completion (mask 0), then the completion
        (mask 1). Returns the number of env tokens appended."""
        between = prompt_ids[self.seq_len :]
        k = len(between)
        self.completion += between
        self.logprobs += [0.0] * k
        self.mask += [0] * k
        self.completion += completion
        self.logprobs += logprobs
        self.mask += [1] * len(completion)
        self.seq_len = len(prompt_ids) + len(completion)
        # A row's staleness is bounded by its oldest sampled token, so the row carries the minimum version.
        self.policy_version = min(self.policy_version, version)
        return k


@dataclass
class TrajectoryAdapter:
    """Turns a rollout's spans into training rows (see the module docstring for the merge rule).

    Only the spans of the rollout's final attempt (``rollout.attempt_count``) are used: earlier attempts
    failed or timed out, and their reward is not the rollout's.

    Every row gets the rollout's reward, its ``group_id`` (else its task id, so that GRPO groups the
    rollouts of one task) and, as ``policy_version``, the *oldest* version among its calls: a row mixing
    tokens of ``policy-v3`` and ``policy-v4`` is as off-policy as its v3 tokens, so a staleness limit must
    judge it by those.
    """

    tag: str | None = None
    """Train only llm calls with this tag (``LLMCallRecord.tag``); ``None`` trains every call. Calls with
    another tag are counted in ``skipped_calls``; when a later trained call's prompt runs through a skipped
    call, the skipped call's tokens become env tokens (mask 0) of the row, which is what they are for the
    trained policy: context it did not produce."""

    def adapt(self, rollout: Rollout, spans: list[Span]) -> AdapterResult:
        """The rows of one rollout and its counters."""
        result = AdapterResult()
        self._adapt_into(rollout, spans, result)
        return result

    def adapt_many(self, rollouts_with_spans: Iterable[tuple[Rollout, list[Span]]]) -> AdapterResult:
        """The rows of many rollouts, in order, with the counters summed."""
        result = AdapterResult()
        for rollout, spans in rollouts_with_spans:
            self._adapt_into(rollout, spans, result)
        return result

    def _adapt_into(self, rollout: Rollout, spans: list[Span], result: AdapterResult) -> None:
        result.rollouts += 1
        reward = rollout.reward
        if reward is None:
            result.no_reward += 1
            return
        rollout_id = rollout.rollout_id
        attempt = rollout.attempt_count
        calls: list[Span] = []
        for span in spans:
            if span.rollout_id != rollout_id:
                raise AdapterError(
                    f"span {span.span_id} belongs to rollout {span.rollout_id!r}, not to {rollout_id!r}"
                )
            if span.kind == SpanKind.LLM:
                if span.attempt_no == attempt:
                    calls.append(span)
                else:
                    result.earlier_attempt_calls += 1
        calls.sort(key=span_order)
        result.llm_calls += len(calls)

        rows: list[_OpenRow] = []
        tag = self.tag
        for span in calls:
            attrs = span.attributes
            if tag is not None and attrs.get("tag") != tag:
                result.skipped_calls += 1
                continue
            prompt_ids, completion_ids, logprobs, version = _token_fields(span, attrs)
            row = _longest_prefix_row(rows, prompt_ids)
            if row is None:
                if rows:
                    result.forked_rows += 1
                    cause = _fork_cause(attrs)
                    result.fork_causes[cause] = result.fork_causes.get(cause, 0) + 1
                rows.append(_OpenRow(prompt_ids, completion_ids, logprobs, version))
            else:
                result.env_tokens += row.extend(prompt_ids, completion_ids, logprobs, version)
            result.policy_tokens += len(completion_ids)

        if not rows:
            result.empty_rollouts += 1
            return
        group_id = rollout.group_id or rollout.task.id
        task_id = rollout.task.id
        for row in rows:
            result.rows.append(
                Trajectory.model_construct(
                    rollout_id=rollout_id,
                    prompt_ids=row.prompt,
                    completion_ids=row.completion,
                    logprobs=row.logprobs,
                    env_mask=row.mask,
                    reward=reward,
                    group_id=group_id,
                    policy_version=row.policy_version,
                    task_id=task_id,
                )
            )


def span_order(span: Span) -> tuple[bool, int, float]:
    """Sort key of a rollout's spans: the store's ``sequence``; spans without one (made by hand) come after,
    in start-time order."""
    return (span.sequence is None, span.sequence or 0, span.start_time)


def _longest_prefix_row(rows: list[_OpenRow], prompt_ids: list[int]) -> _OpenRow | None:
    """The row with the longest sequence that ``prompt_ids`` extends, or ``None``.

    Every row stays open, not only the last one: after ``n > 1`` choices of one prompt the agent continues
    from one of them, and that continuation belongs to that choice's row.
    """
    best: _OpenRow | None = None
    for row in rows:
        if (best is None or row.seq_len > best.seq_len) and row.is_prefix_of(prompt_ids):
            best = row
    return best


def _fork_cause(attrs: dict[str, Any]) -> str:
    """The gateway's cause for a call that starts a new row, or what else it is."""
    cause = attrs.get("fork_cause")
    if cause:
        return str(cause)
    return "another_choice" if attrs.get("choice_index", 0) else "new_conversation"


def _token_fields(span: Span, attrs: dict[str, Any]) -> tuple[list[int], list[int], list[float], int]:
    """The token fields of an llm span; missing or misaligned ones are an :class:`AdapterError` because a
    misaligned row would train the wrong tokens without any visible failure."""
    try:
        prompt_ids = attrs["prompt_ids"]
        completion_ids = attrs["completion_ids"]
        logprobs = attrs["logprobs"]
    except KeyError as exc:
        raise AdapterError(
            f"llm span {span.span_id} of rollout {span.rollout_id} has no {exc.args[0]!r} attribute; "
            "llm spans must carry the fields of LLMCallRecord"
        ) from None
    if len(logprobs) != len(completion_ids):
        raise AdapterError(
            f"llm span {span.span_id} of rollout {span.rollout_id}: {len(logprobs)} logprobs for "
            f"{len(completion_ids)} completion_ids; expected one logprob per completion token"
        )
    return prompt_ids, completion_ids, logprobs, attrs.get("policy_version", 0)

"""The rules every store shares, as pure functions: the rollout state machine and what a resources record
may contain when stored.

Both stores load a rollout (and its open attempt), call one of these functions and write back what it returns.
Keeping the rules here, away from storage, means the in-memory store used by tests and the durable SQLite
store cannot drift apart: a retry, a double finish, a cancel or a stored api key means exactly the same
thing in both.

The functions never mutate their arguments; they return new records (``model_copy``), so a record that a
store has already handed out keeps describing the moment it was handed out.
"""

from __future__ import annotations

import math
from bisect import insort

from rltrain.store.base import StoreError
from rltrain.types import Attempt, Resources, Rollout, RolloutStatus, Span

#: Attempt outcomes after which a rollout may be tried again (a success or a cancel is never retried).
RETRYABLE = frozenset({RolloutStatus.FAILED, RolloutStatus.TIMED_OUT})


def check_enqueueable(rollout: Rollout) -> None:
    """Only fresh rollouts enter the queue: anything else would break the attempt bookkeeping."""
    if rollout.status is not RolloutStatus.QUEUED or rollout.attempt_count != 0:
        raise StoreError(
            f"rollout {rollout.rollout_id}: enqueue expects status 'queued' with attempt_count 0, "
            f"got status {rollout.status.value!r} with attempt_count {rollout.attempt_count}"
        )


def claim(rollout: Rollout, worker_id: str, now: float) -> tuple[Rollout, Attempt]:
    """Mark a queued rollout running and open its next attempt."""
    if rollout.status is not RolloutStatus.QUEUED:
        raise StoreError(
            f"rollout {rollout.rollout_id}: only a queued rollout can be claimed, it is {rollout.status}"
        )
    attempt_no = rollout.attempt_count + 1
    running = rollout.model_copy(
        update={
            "status": RolloutStatus.RUNNING,
            "attempt_count": attempt_no,
            "started_at": now if rollout.started_at is None else rollout.started_at,
        }
    )
    attempt = Attempt(
        rollout_id=rollout.rollout_id, attempt_no=attempt_no, worker_id=worker_id, started_at=now
    )
    return running, attempt


def finish(
    rollout: Rollout,
    attempt: Attempt | None,
    attempt_no: int,
    status: RolloutStatus,
    reward: float | None,
    error: str | None,
    requeue: bool,
    now: float,
) -> tuple[Rollout, Attempt]:
    """Close the open attempt ``attempt_no``; requeue the rollout or make the outcome final.

    ``attempt`` is the stored attempt with that number (``None`` when there is none). Every check happens
    before anything changes, so a refused call leaves the store as it was.
    """
    status = _final_status(status)
    rid = rollout.rollout_id
    if reward is not None and not math.isfinite(reward):
        raise StoreError(f"rollout {rid}: reward must be a finite number or None, got {reward!r}")
    if rollout.status.finished:
        raise StoreError(
            f"rollout {rid} is already finished with status {rollout.status.value!r}; "
            "finishing it again would count it twice"
        )
    if attempt is None or attempt.status is not RolloutStatus.RUNNING or attempt_no != rollout.attempt_count:
        raise StoreError(
            f"rollout {rid}: attempt_no {attempt_no} is not its open attempt "
            f"(status {rollout.status.value!r}, attempt_count {rollout.attempt_count})"
        )
    closed = attempt.model_copy(update={"status": status, "ended_at": now, "error": error})
    if requeue:
        if status not in RETRYABLE:
            raise StoreError(
                f"rollout {rid}: only a failed or timed_out attempt can be requeued, "
                f"got status {status.value!r}"
            )
        if rollout.attempt_count >= rollout.max_attempts:
            raise StoreError(
                f"rollout {rid} has used {rollout.attempt_count} of max_attempts={rollout.max_attempts}; "
                "finish it without requeue"
            )
        return rollout.model_copy(update={"status": RolloutStatus.QUEUED}), closed
    final = rollout.model_copy(update={"status": status, "reward": reward, "error": error, "ended_at": now})
    return final, closed


def cancel(rollout: Rollout, attempt: Attempt | None, now: float) -> tuple[Rollout | None, Attempt | None]:
    """Cancel a queued or running rollout and close its open attempt. Returns ``(None, None)`` for a
    finished rollout (left as it is) and ``attempt=None`` when there was no open attempt."""
    if rollout.status.finished:
        return None, None
    cancelled = rollout.model_copy(update={"status": RolloutStatus.CANCELLED, "ended_at": now})
    if attempt is None or attempt.status is not RolloutStatus.RUNNING:
        return cancelled, None
    return cancelled, attempt.model_copy(update={"status": RolloutStatus.CANCELLED, "ended_at": now})


def public_resources(resources: Resources) -> Resources:
    """The copy of ``resources`` that a store keeps: the llm api key masked, so no secret is ever stored."""
    data = resources.model_dump(mode="json")
    data["llm"] = resources.llm.model_dump_public()
    return Resources.model_validate(data)


def _final_status(status: RolloutStatus | str) -> RolloutStatus:
    try:
        value = RolloutStatus(status)
    except ValueError as exc:
        raise StoreError(f"finish_attempt status {status!r} is not a RolloutStatus") from exc
    if not value.finished:
        raise StoreError(
            "finish_attempt status must be a final status (succeeded, failed, timed_out, cancelled), "
            f"got {value.value!r}"
        )
    return value


def assign_sequences(spans: list[Span], next_free: dict[str, int]) -> list[int]:
    """The sequence number each span of a batch is stored with.

    ``next_free`` maps every rollout of the batch to its next unused sequence (one more than the highest
    stored, across all attempts, so numbers keep rising through retries); it is advanced in place. A span that
    brings its own sequence keeps it and pushes the next free number past it.
    """
    numbers: list[int] = []
    for span in spans:
        rid = span.rollout_id
        if span.sequence is None:
            number = next_free[rid]
        else:
            number = span.sequence
        next_free[rid] = max(next_free[rid], number + 1)
        numbers.append(number)
    return numbers


def span_order(span: Span) -> tuple[int, int]:
    """Where a stored span sorts within its rollout: by attempt, then sequence."""
    return span.attempt_no, span.sequence  # type: ignore[return-value]  # stored spans always have one


def insert_span(ordered: list[Span], span: Span) -> None:
    """Put a stored span into its rollout's ordered list (appending, the usual case, costs no search)."""
    if not ordered or span_order(ordered[-1]) < span_order(span):
        ordered.append(span)
    else:
        insort(ordered, span, key=span_order)

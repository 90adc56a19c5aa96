"""The rules every store shares, as pure functions: the rollout state machine, what a batch of new rollouts
is (``enqueue_tasks``) and what a resources record may contain when stored.

Both stores load a rollout (and its open attempt), call one of these functions and write back what it returns.
Keeping the rules here, away from storage, means the in-memory store used by tests and the durable SQLite
store cannot drift apart: a retry, a double finish, a cancel or a stored api key means exactly the same
thing in both.

The functions never mutate their arguments; they return new records (``model_copy``), so a record that a
store has already handed out keeps describing the moment it was handed out.
"""

from __future__ import annotations

import math
import os
import time
from bisect import insort
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rltrain.store.base import StoreError
from rltrain.types import Attempt, Resources, Rollout, RolloutStatus, Span, Task

#: Attempt outcomes after which a rollout may be tried again (a success or a cancel is never retried).
RETRYABLE = frozenset({RolloutStatus.FAILED, RolloutStatus.TIMED_OUT})


def check_enqueueable(rollout: Rollout) -> None:
    """Only fresh rollouts enter the queue: anything else would break the attempt bookkeeping."""
    if rollout.status is not RolloutStatus.QUEUED or rollout.attempt_count != 0:
        raise StoreError(
            f"rollout {rollout.rollout_id}: enqueue expects status 'queued' with attempt_count 0, "
            f"got status {rollout.status.value!r} with attempt_count {rollout.attempt_count}"
        )


def new_rollout_ids(n: int) -> list[str]:
    """``n`` unguessable rollout ids (``ro-`` and 16 hex digits: 64 random bits), from one ``os.urandom`` read.

    Unguessable because a rollout id is in the base URL an agent is lent (``/rollouts/<id>/...``), and that URL
    is all the gateway asks of a call that records into the rollout: ids from a counter would let one agent
    compute its neighbours' URLs and write into their spans. One read for the whole batch, cut into ids by
    ``bytes.hex``'s separator and ``str.split`` (no Python step per id), costs about 0.07 µs an id, against
    0.13 µs for slicing one hex string per id and 0.65 µs for ``secrets.token_hex`` per id.
    """
    if n == 0:
        return []
    return ("ro-" + os.urandom(8 * n).hex(" ", 8).replace(" ", " ro-")).split(" ")


@dataclass(frozen=True)
class NewBatch:
    """The rollouts ``enqueue_tasks`` adds, before a store keeps them in its own form.

    Rollouts of one task form one group: ``group_id`` is ``"{task.id}@{batch_id}"`` (``None`` without a batch,
    and grouping then falls back to the task id). All of them share one ``created_at``, the enqueue time.

    Why not ``Rollout(...)`` per rollout: pydantic validation costs about 2 µs a rollout, half of enqueueing
    one. Here the fields the batch shares are validated once, in ``template``, and each rollout differs from it
    only in its id, its task (a ``Task`` record, validated when it was made) and its group: the SQLite store
    writes rows from that directly, the memory store makes records with :meth:`rollouts`.
    """

    template: Rollout  # the shared fields, validated; its own id, task and group are not used
    #: per rollout, in order: its id, its task (each task repeats group_size times), its group
    ids: list[str]
    tasks: Sequence[Task]
    group_ids: Sequence[str | None]

    def rollouts(self) -> list[Rollout]:
        """The rollouts as records, made the way ``Rollout.model_construct`` makes one (its four slots set
        directly; every value is already valid): about 1 µs a rollout. ``model_construct`` itself is no help,
        as it resolves every field's default in Python (4 to 7 µs a rollout).

        Much of that microsecond is memory, so two parts of each record are laid out small (same contents,
        same behaviour). Its ``__dict__`` is a copy of a key-sharing dict (:func:`_key_sharing_fields`): 264
        bytes instead of 464. Its fields set is grown from seven names to eight, which keeps CPython's 16-slot
        table (472 bytes, from Python's small-object allocator), where a set copied whole from eight names
        gets 32 slots (728 bytes, from ``malloc``). Each saves 0.1 to 0.2 µs a rollout, mostly in fresh pages.
        """
        values = _key_sharing_fields(self.template)
        made: list[Rollout] = []
        # names looked up once, not per rollout (0.1 µs a rollout)
        new, append = Rollout.__new__, made.append
        fields_set, last_field = _BATCH_FIELDS_BUT_ONE.union, _BATCH_FIELDS_LAST
        for rollout_id, task, group_id in zip(self.ids, self.tasks, self.group_ids):
            fields = values.copy()
            fields["rollout_id"], fields["task"], fields["group_id"] = rollout_id, task, group_id
            rollout = new(Rollout)
            _set(rollout, "__dict__", fields)
            _set(rollout, "__pydantic_fields_set__", fields_set(last_field))
            _set(rollout, "__pydantic_extra__", None)
            _set(rollout, "__pydantic_private__", None)
            append(rollout)
        return made


_set = object.__setattr__
#: what pydantic records as explicitly set on a rollout of a NewBatch (``model_fields_set``): seven names,
#: then the eighth (``NewBatch.rollouts`` says why)
_BATCH_FIELDS_BUT_ONE = {
    "rollout_id", "task", "mode", "resources_version", "batch_id", "group_id", "max_attempts"
}
_BATCH_FIELDS_LAST = {"created_at"}


def _key_sharing_fields(record: Rollout) -> dict[str, Any]:
    """``record.__dict__`` as a key-sharing dict: the field names live once, in the class, and the dict and
    each of its copies hold only the values. CPython makes an instance's attribute dict this way when the
    attributes are set one by one; pydantic builds ``__dict__`` as a plain dict instead."""
    bare = Rollout.__new__(Rollout)
    for name, value in record.__dict__.items():
        _set(bare, name, value)
    return bare.__dict__


def new_batch(
    tasks: Sequence[Task],
    *,
    mode: str,
    resources_version: int,
    batch_id: str | None,
    group_size: int,
    max_attempts: int,
) -> NewBatch | None:
    """``group_size`` new queued rollouts per task, in task order (``None`` for no tasks)."""
    if group_size < 1:
        raise StoreError(f"enqueue_tasks: group_size must be >= 1, got {group_size}")
    for index, task in enumerate(tasks):
        if not isinstance(task, Task):
            raise StoreError(f"enqueue_tasks: tasks[{index}] must be a Task, got {type(task).__name__}")
    if not tasks:
        return None
    template = Rollout(
        task=tasks[0],
        mode=mode,
        resources_version=resources_version,
        batch_id=batch_id,
        max_attempts=max_attempts,
        created_at=time.time(),
    )
    members = tasks if group_size == 1 else [task for task in tasks for _ in range(group_size)]
    group_ids = [None] * len(members) if batch_id is None else [f"{task.id}@{batch_id}" for task in members]
    return NewBatch(template, new_rollout_ids(len(members)), members, group_ids)


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

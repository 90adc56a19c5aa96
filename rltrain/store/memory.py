"""In-process store: dictionaries behind one lock, for tests, benchmarks and throw-away runs.

It follows the ownership rule of :mod:`rltrain.store` to the letter, which is why it is fast: records are
kept as the very objects passed in and handed out as the very objects kept, with no copies on any path.
The store itself never changes a record it has handed out: every status change stores a new object (see
:mod:`rltrain.store.rules`), so a rollout returned by ``claim_rollout`` still says ``running`` after the
attempt finished, exactly like a row read from the SQLite store would.

Unlike :class:`rltrain.store.sqlite.SqliteStore`, span attributes and task payloads are not checked to be
JSON-serialisable here (that would cost a serialisation per span); the durable store rejects them.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Sequence

from rltrain.store import rules
from rltrain.store.base import StoreError, UnknownRolloutError
from rltrain.types import Attempt, Resources, Rollout, RolloutStatus, Span, Task


class MemoryStore:
    """The :class:`~rltrain.store.base.Store` protocol in process memory (thread-safe, not durable)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rollouts: dict[str, Rollout] = {}  # insertion order is creation order
        self._position: dict[str, int] = {}  # enqueue position: the claim order, kept across requeues
        self._at_position: list[str] = []  # the rollout id at each position
        # One heap of positions per (mode, batch_id), the claim filters; an emptied heap is
        # removed. Entries of rollouts cancelled while queued stay behind and are dropped when they reach the
        # top (cheaper than removing them from the middle of a heap).
        self._queues: dict[tuple[str, str | None], list[int]] = {}
        self._attempts: dict[str, list[Attempt]] = {}  # from a rollout's first claim on
        self._spans: dict[str, list[Span]] = {}  # per rollout, ordered by (attempt_no, sequence)
        self._next_sequence: dict[str, int] = {}
        self._span_ids: set[tuple[str, str]] = set()  # (rollout_id, span_id)
        self._span_keys: set[tuple[str, int, int]] = set()  # (rollout_id, attempt_no, sequence)
        self._resources: dict[int, Resources] = {}

    # -- rollouts -------------------------------------------------------------------------------------
    def enqueue_rollouts(self, rollouts: list[Rollout]) -> None:
        with self._lock:
            seen: set[str] = set()
            for rollout in rollouts:
                rules.check_enqueueable(rollout)
                rid = rollout.rollout_id
                if rid in self._rollouts or rid in seen:
                    raise StoreError(
                        f"rollout_id {rid!r} is already in the store; rollout ids must be unique"
                    )
                seen.add(rid)
            for rollout in rollouts:
                self._insert([rollout.rollout_id], [rollout], (rollout.mode, rollout.batch_id))

    def enqueue_tasks(
        self,
        tasks: Sequence[Task],
        *,
        mode: str = "train",
        resources_version: int = 0,
        batch_id: str | None = None,
        group_size: int = 1,
        max_attempts: int = 1,
    ) -> list[str]:
        batch = rules.new_batch(
            tasks,
            mode=mode,
            resources_version=resources_version,
            batch_id=batch_id,
            group_size=group_size,
            max_attempts=max_attempts,
        )
        if batch is None:
            return []
        rollouts = batch.rollouts()
        with self._lock:
            if not self._rollouts.keys().isdisjoint(batch.ids):  # 64 random bits each: a broken random source
                repeated = next(rid for rid in batch.ids if rid in self._rollouts)
                raise StoreError(
                    f"new rollout_id {repeated!r} is already in the store; rollout ids must be unique"
                )
            self._insert(batch.ids, rollouts, (batch.template.mode, batch.template.batch_id))
        return batch.ids

    def _insert(self, ids: list[str], rollouts: list[Rollout], queue: tuple[str, str | None]) -> None:
        """Add checked, fresh rollouts (``ids`` theirs) that all go to the claim queue ``(mode, batch_id)``
        (lock held). Positions only grow, so each new one is larger than everything already in the queue's
        heap, and appending them in order keeps it a heap: one ``extend``, no ``heappush`` per rollout."""
        positions = range(len(self._at_position), len(self._at_position) + len(ids))
        self._rollouts.update(zip(ids, rollouts))
        self._position.update(zip(ids, positions))
        self._at_position.extend(ids)
        self._queues.setdefault(queue, []).extend(positions)

    def claim_rollout(
        self, worker_id: str, mode: str | None = None, batch_id: str | None = None
    ) -> tuple[Rollout, Attempt] | None:
        with self._lock:
            heap = self._oldest_queue(mode, batch_id)
            if heap is None:
                return None
            rid = self._at_position[heapq.heappop(heap)]
            rollout, attempt = rules.claim(self._rollouts[rid], worker_id, time.time())
            self._rollouts[rid] = rollout
            self._attempts.setdefault(rid, []).append(attempt)
            return rollout, attempt

    def _push(self, rollout: Rollout) -> None:
        queue = self._queues.setdefault((rollout.mode, rollout.batch_id), [])
        heapq.heappush(queue, self._position[rollout.rollout_id])

    def _oldest_queue(self, mode: str | None, batch_id: str | None) -> list[int] | None:
        """The heap whose top is the oldest queued rollout matching the filters, or ``None``."""
        best: list[int] | None = None
        for key, heap in list(self._queues.items()):
            if (mode is not None and key[0] != mode) or (batch_id is not None and key[1] != batch_id):
                continue
            while heap and self._rollouts[self._at_position[heap[0]]].status is not RolloutStatus.QUEUED:
                heapq.heappop(heap)
            if not heap:
                del self._queues[key]
            elif best is None or heap[0] < best[0]:
                best = heap
        return best

    def finish_attempt(
        self,
        rollout_id: str,
        attempt_no: int,
        status: RolloutStatus,
        reward: float | None = None,
        error: str | None = None,
        requeue: bool = False,
    ) -> Rollout:
        with self._lock:
            rollout = self._rollout(rollout_id)
            attempts = self._attempts.get(rollout_id, [])
            attempt = attempts[attempt_no - 1] if 1 <= attempt_no <= len(attempts) else None
            rollout, closed = rules.finish(
                rollout, attempt, attempt_no, status, reward, error, requeue, time.time()
            )
            self._rollouts[rollout_id] = rollout
            attempts[attempt_no - 1] = closed
            if rollout.status is RolloutStatus.QUEUED:
                self._push(rollout)
            return rollout

    def cancel_rollouts(self, rollout_ids: list[str]) -> None:
        with self._lock:
            targets = [self._rollout(rid) for rid in rollout_ids]
            now = time.time()
            for rollout in targets:
                attempts = self._attempts.get(rollout.rollout_id, [])
                cancelled, closed = rules.cancel(rollout, attempts[-1] if attempts else None, now)
                if cancelled is not None:
                    self._rollouts[rollout.rollout_id] = cancelled
                if closed is not None:
                    attempts[-1] = closed

    def get_rollout(self, rollout_id: str) -> Rollout:
        with self._lock:
            return self._rollout(rollout_id)

    def get_rollout_nowait(self, rollout_id: str) -> Rollout | None:
        with self._lock:
            return self._rollouts.get(rollout_id)

    def list_rollouts(
        self,
        status: RolloutStatus | None = None,
        mode: str | None = None,
        resources_version: int | None = None,
    ) -> list[Rollout]:
        with self._lock:
            return [
                r
                for r in self._rollouts.values()
                if (status is None or r.status == status)
                and (mode is None or r.mode == mode)
                and (resources_version is None or r.resources_version == resources_version)
            ]

    def get_attempts(self, rollout_id: str) -> list[Attempt]:
        with self._lock:
            self._rollout(rollout_id)
            return list(self._attempts.get(rollout_id, []))

    def _rollout(self, rollout_id: str) -> Rollout:
        try:
            return self._rollouts[rollout_id]
        except KeyError:
            raise UnknownRolloutError(f"unknown rollout_id {rollout_id!r}") from None

    # -- spans ----------------------------------------------------------------------------------------
    def add_spans(self, spans: list[Span]) -> list[Span]:
        with self._lock:
            return self._add_spans(spans)

    def add_spans_nowait(self, spans: list[Span]) -> bool:
        with self._lock:
            for span in spans:
                rollout = self._rollouts.get(span.rollout_id)
                if (
                    rollout is None
                    or rollout.status is not RolloutStatus.RUNNING
                    or rollout.attempt_count != span.attempt_no
                    or span.sequence is not None
                ):
                    return False
            self._add_spans(spans)
            return True

    def _add_spans(self, spans: list[Span]) -> list[Span]:
        """``add_spans`` with the lock held."""
        next_free: dict[str, int] = {}
        for span in spans:
            if span.rollout_id not in next_free:
                self._rollout(span.rollout_id)
                next_free[span.rollout_id] = self._next_sequence.get(span.rollout_id, 0)
        numbers = rules.assign_sequences(spans, next_free)
        batch_ids: set[tuple[str, str]] = set()
        batch_keys: set[tuple[str, int, int]] = set()
        for span, number in zip(spans, numbers):
            span_key = (span.rollout_id, span.span_id)
            key = (span.rollout_id, span.attempt_no, number)
            if span_key in self._span_ids or span_key in batch_ids:
                raise StoreError(
                    f"rollout {span.rollout_id} already has a span with span_id {span.span_id!r}; "
                    "span ids must be unique within a rollout"
                )
            if key in self._span_keys or key in batch_keys:
                raise StoreError(
                    f"rollout {span.rollout_id} attempt {span.attempt_no} already has a span with "
                    f"sequence {number}"
                )
            batch_ids.add(span_key)
            batch_keys.add(key)
        for span, number in zip(spans, numbers):
            span.sequence = number
            rules.insert_span(self._spans.setdefault(span.rollout_id, []), span)
        self._span_ids |= batch_ids
        self._span_keys |= batch_keys
        self._next_sequence.update(next_free)
        return spans

    def get_spans(self, rollout_id: str, attempt_no: int | None = None) -> list[Span]:
        with self._lock:
            self._rollout(rollout_id)
            stored = self._spans.get(rollout_id, [])
            if attempt_no is None:
                return list(stored)
            return [s for s in stored if s.attempt_no == attempt_no]

    # -- resources ------------------------------------------------------------------------------------
    def add_resources(self, resources: Resources) -> None:
        public = rules.public_resources(resources)
        with self._lock:
            if public.version in self._resources:
                raise StoreError(
                    f"resources version {public.version} is already published; versions are unique"
                )
            self._resources[public.version] = public

    def get_resources(self, version: int | None = None) -> Resources:
        with self._lock:
            if not self._resources:
                raise StoreError("no resources have been published yet")
            if version is None:
                return self._resources[max(self._resources)]
            try:
                return self._resources[version]
            except KeyError:
                raise StoreError(
                    f"resources version {version} is not published; known: {sorted(self._resources)}"
                ) from None

    def close(self) -> None:
        """Nothing to release: the records live as long as the object."""

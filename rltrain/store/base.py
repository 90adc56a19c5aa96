"""The Store protocol: the one place rollouts, attempts, spans and resources live.

Two implementations share it: :mod:`rltrain.store.sqlite` (default, durable, one file in the run directory,
safe across threads and processes) and :mod:`rltrain.store.memory` (tests, benchmarks). Everything that
records or reads rollouts goes through this protocol, so the runner, gateway and adapters never know which.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from rltrain.types import Attempt, Resources, Rollout, RolloutStatus, Span, Task


class StoreError(RuntimeError):
    """A store operation that cannot be done (unknown rollout, illegal status change, corrupt file)."""


class UnknownRolloutError(StoreError, KeyError):
    """A rollout id the store has never seen."""


@runtime_checkable
class Store(Protocol):
    """Queue + record of rollouts. All methods are thread-safe; timestamps are ``time.time()`` seconds."""

    # -- rollouts -------------------------------------------------------------------------------------
    def enqueue_rollouts(self, rollouts: list[Rollout]) -> None:
        """Add rollouts in status ``queued`` (one transaction for the whole list)."""

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
        """Add ``group_size`` new queued rollouts of every task, in task order (one transaction); returns their
        ids. The batch path, the runner's: the fields the rollouts share are validated once, not per rollout,
        and the ids are unguessable (see :class:`rltrain.store.rules.NewBatch` for the group ids and the cost,
        :func:`rltrain.store.rules.new_rollout_ids` for why unguessable)."""

    def claim_rollout(
        self, worker_id: str, mode: str | None = None, batch_id: str | None = None
    ) -> tuple[Rollout, Attempt] | None:
        """Atomically take the oldest queued rollout (optionally only of one ``mode`` and/or ``batch_id``), mark
        it running, open a new attempt (``attempt_count + 1``) and return both; ``None`` when none is queued."""

    def finish_attempt(
        self,
        rollout_id: str,
        attempt_no: int,
        status: RolloutStatus,
        reward: float | None = None,
        error: str | None = None,
        requeue: bool = False,
    ) -> Rollout:
        """Close an attempt with ``status``. With ``requeue`` the rollout goes back to ``queued`` for another
        attempt; otherwise the rollout takes the attempt's status, reward and error as final."""

    def cancel_rollouts(self, rollout_ids: list[str]) -> None:
        """Mark queued or running rollouts ``cancelled`` (finished ones are left as they are)."""

    def get_rollout(self, rollout_id: str) -> Rollout:
        """The rollout; raises :class:`UnknownRolloutError`."""

    def get_rollout_nowait(self, rollout_id: str) -> Rollout | None:
        """The rollout when the store can tell without blocking (no file I/O, no lock that I/O holds), for an
        event loop to call directly; ``None`` means: ask :meth:`get_rollout` (from a worker thread).

        The memory store always can (``None`` for an unknown id). The SQLite store can for the rollouts it
        claimed itself and has not finished: they run, at the attempt it opened, until it finishes them (a
        finish or cancel through another store object on the same file is seen by ``get_rollout`` only)."""

    def list_rollouts(
        self, status: RolloutStatus | None = None, mode: str | None = None, resources_version: int | None = None
    ) -> list[Rollout]:
        """Rollouts in creation order, filtered by whatever is given."""

    def get_attempts(self, rollout_id: str) -> list[Attempt]:
        """Attempts of a rollout in order."""

    # -- spans ----------------------------------------------------------------------------------------
    def add_spans(self, spans: list[Span]) -> list[Span]:
        """Record spans (one transaction); spans with ``sequence=None`` get the next numbers of their rollout.
        Returns the spans as stored (with sequences)."""

    def add_spans_nowait(self, spans: list[Span]) -> bool:
        """Record spans of running attempts without blocking, when the store can; for an event loop (the
        gateway records every chat completion this way, so the answer never waits for a disk write).

        Taken only when every span belongs to the attempt its rollout runs now (``attempt_no`` equal to the
        rollout's ``attempt_count``), has ``sequence=None`` and, for the SQLite store, its rollout was claimed
        through this very store object. Otherwise nothing is recorded and the answer is ``False``: call
        :meth:`add_spans` then (it may block), after checking why.

        **Durability.** Spans taken are numbered and written no later than when the next ``finish_attempt``,
        ``cancel_rollouts``, ``add_spans``, ``get_spans``, ``integrity_check`` or ``close`` of this store
        returns; in particular **a finished rollout's spans are all durable before the ``finish_attempt`` that
        finished it returns**, in the same transaction. (A span that cannot be written then, e.g. attributes
        that are not JSON, is logged as an error and left out; the memory store has nothing to write.)"""

    def get_spans(self, rollout_id: str, attempt_no: int | None = None) -> list[Span]:
        """Spans of a rollout ordered by (attempt, sequence); only one attempt's when ``attempt_no`` is given."""

    # -- resources ------------------------------------------------------------------------------------
    def add_resources(self, resources: Resources) -> None:
        """Publish a resources version (versions are unique; re-adding one is an error)."""

    def get_resources(self, version: int | None = None) -> Resources:
        """A version, or the newest when ``version`` is None; raises :class:`StoreError` when there is none."""

    def close(self) -> None:
        """Release files and connections."""

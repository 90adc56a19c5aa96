"""The Store protocol: the one place rollouts, attempts, spans and resources live.

Two implementations share it: :mod:`rltrain.store.sqlite` (default, durable, one file in the run directory,
safe across threads and processes) and :mod:`rltrain.store.memory` (tests, benchmarks). Everything that
records or reads rollouts goes through this protocol, so the runner, gateway and adapters never know which.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from rltrain.types import Attempt, Resources, Rollout, RolloutStatus, Span


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

    def get_spans(self, rollout_id: str, attempt_no: int | None = None) -> list[Span]:
        """Spans of a rollout ordered by (attempt, sequence); only one attempt's when ``attempt_no`` is given."""

    # -- resources ------------------------------------------------------------------------------------
    def add_resources(self, resources: Resources) -> None:
        """Publish a resources version (versions are unique; re-adding one is an error)."""

    def get_resources(self, version: int | None = None) -> Resources:
        """A version, or the newest when ``version`` is None; raises :class:`StoreError` when there is none."""

    def close(self) -> None:
        """Release files and connections."""

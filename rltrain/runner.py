"""Concurrent rollouts with timeouts, bounded retries, cancellation and failure isolation.

The store is the queue: :meth:`Runner.run` enqueues one rollout per (task, generation), then ``concurrency``
workers claim, execute and finish them. Whatever an agent does (raise, hang, return garbage) ends that attempt
only, with the reason recorded as a span and on the rollout; the rest of the batch goes on.
"""

from __future__ import annotations

import asyncio
import logging
import math
import numbers
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, fields

from tqdm.auto import tqdm

from rltrain.agent import Agent, RolloutContext, format_exception
from rltrain.recipes import RunnerConfig
from rltrain.store.base import Store
from rltrain.types import Resources, Rollout, RolloutStatus, SpanKind, Task

logger = logging.getLogger(__name__)


class TrainingAbortedError(RuntimeError):
    """A training step whose rollouts mostly failed: training on it would be training on noise."""


#: characters of an error message that count as its reason when failures are tallied (ids and numbers that
#: follow rarely tell two failures apart)
_REASON_CHARS = 400


class RewardError(ValueError):
    """An agent returned something that is not a usable reward."""


def validate_reward(value: object) -> tuple[float | None, str | None]:
    """Check an agent's result: ``(reward, note)``.

    ``None`` means "no reward" (the rollout succeeds but trains nothing). A number outside [0, 1] is clipped and
    the note says so; NaN, infinities and non-numbers raise :class:`RewardError` (the attempt fails with that
    reason instead of poisoning the advantages).
    """
    if value is None:
        return None, None
    if not isinstance(value, numbers.Real):
        raise RewardError(
            f"agent returned {type(value).__name__} {value!r:.60}; expected a float in [0, 1] or None"
        )
    reward = float(value)
    if not math.isfinite(reward):
        raise RewardError(f"agent returned a non-finite reward ({reward}); expected a float in [0, 1]")
    if reward < 0.0 or reward > 1.0:
        clipped = min(1.0, max(0.0, reward))
        return clipped, f"reward {reward} clipped to {clipped} (rewards live in [0, 1])"
    return reward, None


@dataclass
class RunStats:
    """Counts of one :meth:`Runner.run`, reported as metrics under ``rollouts/``."""

    succeeded: int = 0
    failed: int = 0
    timed_out: int = 0
    cancelled: int = 0
    retries: int = 0
    clipped_rewards: int = 0
    no_reward: int = 0
    wall_s: float = 0.0
    #: final errors of the failed and timed-out rollouts, by reason (what an aborted step reports)
    errors: Counter[str] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return self.succeeded + self.failed + self.timed_out + self.cancelled

    @property
    def failed_fraction(self) -> float:
        return (self.failed + self.timed_out) / self.total if self.total else 0.0

    def add(self, other: RunStats) -> None:
        """Accumulate another run's counts (a training step made of several runner calls)."""
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_metrics(self, prefix: str = "rollouts/") -> dict[str, float]:
        metrics = {
            f"{prefix}{f.name}": float(getattr(self, f.name))
            for f in fields(self)
            if f.name not in ("wall_s", "errors")
        }
        metrics[f"{prefix}per_s"] = self.total / self.wall_s if self.wall_s > 0 else 0.0
        return metrics

    def stop_if_mostly_failed(self, max_failed_fraction: float, what: str) -> None:
        """Raise :class:`TrainingAbortedError` when more than ``max_failed_fraction`` of the rollouts failed or
        timed out; its message counts them and names the most common reasons (``what`` says which step)."""
        if not self.total or self.failed_fraction <= max_failed_fraction:
            return
        reasons = "; ".join(f"{count}x {reason}" for reason, count in self.errors.most_common(3))
        raise TrainingAbortedError(
            f"{what}: {self.failed + self.timed_out} of {self.total} rollouts failed or timed out (more than "
            f"runner.max_failed_fraction={max_failed_fraction}); most common reasons: {reasons}. Every reason is "
            "an exception span in the store"
        )


@dataclass
class RunResult:
    rollouts: list[Rollout]
    stats: RunStats = field(default_factory=RunStats)


class Runner:
    """Runs an agent over tasks against the gateway at ``gateway_url``, recording everything in ``store``.

    ``gateway_url`` is None for agents that call no model (``needs_llm=False``, e.g. a solver teacher): they get
    the resources as given, with no per-rollout endpoint."""

    def __init__(
        self,
        store: Store,
        agent: Agent,
        gateway_url: str | None,
        config: RunnerConfig,
        on_finished: Callable[[Rollout], None] | None = None,
        progress: bool = True,
    ) -> None:
        self.store = store
        self.agent = agent
        self.gateway_url = gateway_url
        self.config = config
        self.on_finished = on_finished
        self.progress = progress

    async def run(
        self,
        tasks: list[Task],
        resources: Resources,
        *,
        mode: str,
        group_size: int = 1,
        desc: str = "rollouts",
    ) -> RunResult:
        """Run ``group_size`` rollouts of every task; returns them (final state) in task order."""
        batch = uuid.uuid4().hex[:8]
        # Unguessable ids (the id in an agent's base URL is all the gateway asks of a call that records), the
        # group_id f"{task.id}@{batch}": see rltrain.store.rules.NewBatch.
        ids = self.store.enqueue_tasks(
            tasks,
            mode=mode,
            resources_version=resources.version,
            batch_id=batch,
            group_size=group_size,
            max_attempts=self.config.max_attempts,
        )
        stats = RunStats()
        start = time.perf_counter()
        bar = tqdm(total=len(ids), desc=desc, disable=not self.progress, leave=False, dynamic_ncols=True)
        workers = [
            asyncio.create_task(self._worker(f"w{i}-{batch}", batch, resources, stats, bar))
            for i in range(min(self.config.concurrency, len(ids)))
        ]
        try:
            await asyncio.gather(*workers)
        except BaseException:
            for worker in workers:
                worker.cancel()
            self.store.cancel_rollouts(ids)
            raise
        finally:
            bar.close()
        stats.wall_s = time.perf_counter() - start
        return RunResult(rollouts=[self.store.get_rollout(rid) for rid in ids], stats=stats)

    async def _worker(
        self, worker_id: str, batch: str, resources: Resources, stats: RunStats, bar: tqdm
    ) -> None:
        while True:
            claimed = self.store.claim_rollout(worker_id, batch_id=batch)
            if claimed is None:
                return
            rollout, attempt = claimed
            final = await self._attempt(rollout, attempt.attempt_no, resources, stats)
            if final is not None:
                bar.update(1)
                if self.on_finished is not None:
                    self.on_finished(final)

    async def _attempt(
        self, rollout: Rollout, attempt_no: int, resources: Resources, stats: RunStats
    ) -> Rollout | None:
        """One attempt; returns the finished rollout, or None when it was re-queued for another attempt."""
        ctx = RolloutContext(rollout.rollout_id, attempt_no, self.store)
        lent = (resources if self.gateway_url is None
                else resources.for_rollout(self.gateway_url, rollout.rollout_id, attempt_no))
        reward: float | None = None
        error: str | None = None
        status = RolloutStatus.SUCCEEDED
        try:
            raw = await asyncio.wait_for(
                self.agent.run(rollout.task.payload, lent, ctx), timeout=self.config.timeout_s
            )
            reward, note = validate_reward(raw)
            if note is not None:
                stats.clipped_rewards += 1
                ctx.record(SpanKind.LOG, "reward_clipped", time.time(), {"message": note})
        except TimeoutError as exc:
            status = RolloutStatus.TIMED_OUT
            error = f"agent did not finish within timeout_s={self.config.timeout_s}"
            ctx.record(SpanKind.EXCEPTION, "timeout", time.time(), {**format_exception(exc), "message": error})
        except Exception as exc:  # noqa: BLE001 - isolation: any agent error fails this attempt only
            status = RolloutStatus.FAILED
            error = f"{type(exc).__name__}: {exc}"
            ctx.record(SpanKind.EXCEPTION, type(exc).__name__, time.time(), format_exception(exc))
        finally:
            ctx.closed = True
        retry = status is not RolloutStatus.SUCCEEDED and attempt_no < rollout.max_attempts
        final = self.store.finish_attempt(
            rollout.rollout_id, attempt_no, status, reward=reward, error=error, requeue=retry
        )
        if retry:
            stats.retries += 1
            logger.info("rollout %s attempt %d %s (%s); retrying", rollout.rollout_id, attempt_no, status, error)
            return None
        if status is RolloutStatus.SUCCEEDED:
            stats.succeeded += 1
            stats.no_reward += reward is None
        elif status is RolloutStatus.TIMED_OUT:
            stats.timed_out += 1
        else:
            stats.failed += 1
        if error:
            stats.errors[error[:_REASON_CHARS]] += 1
            logger.warning("rollout %s (task %s) %s: %s", rollout.rollout_id, rollout.task.id, status, error)
        return final

"""Runner: concurrency, timeouts, retries and failure isolation, on the real stores."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from rltrain.agent import emit_reward, rollout, tool_span
from rltrain.recipes import RunnerConfig
from rltrain.runner import Runner, RewardError, validate_reward
from rltrain.store import MemoryStore, SqliteStore
from rltrain.types import LLMResource, Resources, RolloutStatus, SpanKind, Task


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path):
    s = MemoryStore() if request.param == "memory" else SqliteStore(tmp_path / "store.sqlite")
    yield s
    s.close()


RESOURCES = Resources(llm=LLMResource(base_url="", model="m"))


def tasks(n: int) -> list[Task]:
    return [Task(id=f"t{i}", payload={"i": i}) for i in range(n)]


def run(store, agent, task_list, **config) -> tuple:
    runner = Runner(store, agent, "http://gw", RunnerConfig(**config), progress=False)
    result = asyncio.run(runner.run(task_list, RESOURCES, mode="eval"))
    return result.rollouts, result.stats


def test_rewards_and_resources_reach_the_agent(store) -> None:
    seen = []

    @rollout
    def agent(task, resources):
        seen.append(resources.llm.base_url)
        with tool_span("lookup", {"i": task["i"]}) as call:
            call.result = task["i"] * 2
        return task["i"] / 10

    rollouts, stats = run(store, agent, tasks(5), concurrency=3)
    assert [r.reward for r in rollouts] == [0.0, 0.1, 0.2, 0.3, 0.4]
    assert all(r.status is RolloutStatus.SUCCEEDED for r in rollouts)
    assert stats.succeeded == 5
    # each rollout is attributed by its own base URL on the gateway
    assert sorted(seen) == sorted(f"http://gw/rollouts/{r.rollout_id}/v1" for r in rollouts)
    spans = store.get_spans(rollouts[3].rollout_id)
    assert [(s.kind, s.attributes["result"]) for s in spans] == [(SpanKind.TOOL, 6)]


def test_failure_is_isolated_and_recorded(store) -> None:
    @rollout
    def agent(task, resources):
        if task["i"] == 2:
            raise RuntimeError("tool backend down")
        return 1.0

    rollouts, stats = run(store, agent, tasks(5), concurrency=2)
    failed = rollouts[2]
    assert failed.status is RolloutStatus.FAILED
    assert "tool backend down" in failed.error
    assert [r.status for i, r in enumerate(rollouts) if i != 2] == [RolloutStatus.SUCCEEDED] * 4
    exc = [s for s in store.get_spans(failed.rollout_id) if s.kind is SpanKind.EXCEPTION]
    assert exc and "RuntimeError" in exc[0].attributes["traceback"]
    assert stats.failed == 1 and stats.succeeded == 4


def test_hung_sync_agent_times_out_without_blocking_others(store) -> None:
    release = threading.Event()

    @rollout
    def agent(task, resources):
        if task["i"] == 0:
            release.wait(30)  # hangs well past the timeout
            emit_reward(1.0)  # too late: the rollout has ended, the span must be dropped
        return 1.0

    rollouts, stats = run(store, agent, tasks(4), concurrency=4, timeout_s=0.5)
    release.set()
    assert rollouts[0].status is RolloutStatus.TIMED_OUT
    assert "timeout_s=0.5" in rollouts[0].error
    assert [r.status for r in rollouts[1:]] == [RolloutStatus.SUCCEEDED] * 3
    time.sleep(0.1)
    kinds = [s.kind for s in store.get_spans(rollouts[0].rollout_id)]
    assert kinds == [SpanKind.EXCEPTION]


def test_hung_async_agent_is_cancelled(store) -> None:
    @rollout
    async def agent(task, resources):
        if task["i"] == 1:
            await asyncio.sleep(60)
        return 0.5

    rollouts, _ = run(store, agent, tasks(3), timeout_s=0.3)
    assert [r.status for r in rollouts] == [RolloutStatus.SUCCEEDED, RolloutStatus.TIMED_OUT, RolloutStatus.SUCCEEDED]


def test_retries_are_bounded(store) -> None:
    calls: dict[int, int] = {}

    @rollout
    def agent(task, resources):
        calls[task["i"]] = calls.get(task["i"], 0) + 1
        if task["i"] == 0 and calls[0] < 2:
            raise ValueError("flaky once")
        if task["i"] == 1:
            raise ValueError("always")
        return 1.0

    rollouts, stats = run(store, agent, tasks(2), max_attempts=3)
    assert rollouts[0].status is RolloutStatus.SUCCEEDED and rollouts[0].attempt_count == 2
    assert rollouts[1].status is RolloutStatus.FAILED and rollouts[1].attempt_count == 3
    assert calls == {0: 2, 1: 3}
    assert stats.retries == 3
    assert [a.attempt_no for a in store.get_attempts(rollouts[1].rollout_id)] == [1, 2, 3]


def test_bad_rewards(store) -> None:
    values = [float("nan"), -0.5, "high", None, 3]

    @rollout
    def agent(task, resources):
        return values[task["i"]]

    rollouts, stats = run(store, agent, tasks(5))
    assert rollouts[0].status is RolloutStatus.FAILED and "non-finite" in rollouts[0].error
    assert rollouts[1].status is RolloutStatus.SUCCEEDED and rollouts[1].reward == 0.0
    assert rollouts[2].status is RolloutStatus.FAILED and "expected a float" in rollouts[2].error
    assert rollouts[3].status is RolloutStatus.SUCCEEDED and rollouts[3].reward is None
    assert rollouts[4].reward == 1.0
    assert stats.clipped_rewards == 2 and stats.no_reward == 1


def test_emitted_reward_used_when_agent_returns_none(store) -> None:
    @rollout
    async def agent(task, resources):
        emit_reward(0.25)
        emit_reward(0.75)

    rollouts, _ = run(store, agent, tasks(1))
    assert rollouts[0].reward == 0.75
    rewards = [s.attributes["value"] for s in store.get_spans(rollouts[0].rollout_id) if s.kind is SpanKind.REWARD]
    assert rewards == [0.25, 0.75]


def test_concurrency_is_real(store) -> None:
    active = 0
    peak = 0
    lock = threading.Lock()

    @rollout
    def agent(task, resources):
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        time.sleep(0.05)
        with lock:
            active -= 1
        return 1.0

    run(store, agent, tasks(12), concurrency=6)
    assert 2 <= peak <= 6


def test_two_runs_share_a_store_without_stealing(store) -> None:
    @rollout
    async def agent(task, resources):
        await asyncio.sleep(0.01)
        return 1.0

    async def both():
        r1 = Runner(store, agent, "http://gw", RunnerConfig(concurrency=2), progress=False)
        r2 = Runner(store, agent, "http://gw", RunnerConfig(concurrency=2), progress=False)
        return await asyncio.gather(r1.run(tasks(6), RESOURCES, mode="eval"), r2.run(tasks(4), RESOURCES, mode="eval"))

    a, b = asyncio.run(both())
    assert len(a.rollouts) == 6 and len(b.rollouts) == 4
    assert all(r.status is RolloutStatus.SUCCEEDED for r in a.rollouts + b.rollouts)
    assert a.stats.succeeded == 6 and b.stats.succeeded == 4


def test_validate_reward() -> None:
    assert validate_reward(0.5) == (0.5, None)
    assert validate_reward(True) == (1.0, None)
    assert validate_reward(1.5)[0] == 1.0
    with pytest.raises(RewardError):
        validate_reward(float("inf"))
    with pytest.raises(RewardError):
        validate_reward([1.0])

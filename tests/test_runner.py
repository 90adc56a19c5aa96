"""Runner: rewards, resources, concurrency and shared stores, on the real stores. (Agent faults — raising,
hanging, garbage rewards, retries — are injected in ``tests/reliability/test_agent_faults.py``.)"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from rltrain.agent import emit_reward, rollout, tool_span
from rltrain.recipes import RunnerConfig
from rltrain.runner import RewardError, Runner, validate_reward
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
    assert sorted(seen) == sorted(f"http://gw/rollouts/{r.rollout_id}/attempts/1/v1" for r in rollouts)
    spans = store.get_spans(rollouts[3].rollout_id)
    assert [(s.kind, s.attributes["result"]) for s in spans] == [(SpanKind.TOOL, 6)]


def test_without_a_gateway_the_agent_gets_the_resources_as_given(store) -> None:
    """Agents that call no model (a solver teacher) run with no gateway: no per-rollout URL is invented."""
    seen = []

    @rollout(needs_llm=False)
    def solver(task, resources):
        seen.append(resources.llm.base_url)
        return 1.0

    runner = Runner(store, solver, None, RunnerConfig(), progress=False)
    result = asyncio.run(runner.run(tasks(2), RESOURCES, mode="eval"))
    assert [r.reward for r in result.rollouts] == [1.0, 1.0]
    assert seen == ["", ""]


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

"""Agent faults: an agent that raises, hangs, returns garbage or nothing, or calls the gateway after its attempt
ended. Each fails or is clipped with a recorded reason, retries are bounded, the rest of the batch goes on, the
counts reach the metrics, and a training step that mostly failed stops the run with the reasons.

The runner tests run on both stores; the late-call tests run the real gateway on the tiny model.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from pathlib import Path
from typing import Any

import openai
import pytest
from even_length_env import EvenLengthEnv
from live_gateway import QUESTION, error_of, serve, start_rollouts

from rltrain import envs
from rltrain.agent import emit_reward, rollout
from rltrain.engines.base import GenerationRequest, GenerationResult
from rltrain.engines.transformers import TransformersEngine
from rltrain.recipes import RunnerConfig, parse_recipe
from rltrain.runner import Runner, RunStats, TrainingAbortedError
from rltrain.store import MemoryStore, SqliteStore
from rltrain.trainer import Trainer
from rltrain.types import LLMResource, Resources, RolloutStatus, SpanKind, Task

RESOURCES = Resources(llm=LLMResource(base_url="", model="m"))


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path):
    s = MemoryStore() if request.param == "memory" else SqliteStore(tmp_path / "store.sqlite")
    yield s
    s.close()


def tasks(n: int) -> list[Task]:
    return [Task(id=f"t{i}", payload={"i": i}) for i in range(n)]


def run(store, agent, task_list, gateway_url: str = "http://gw", **config) -> tuple:
    runner = Runner(store, agent, gateway_url, RunnerConfig(**config), progress=False)
    result = asyncio.run(runner.run(task_list, RESOURCES, mode="eval"))
    return result.rollouts, result.stats


# -- moved here from tests/test_runner.py: raising, hanging, garbage rewards, retries ------------------------
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
    assert stats.as_metrics()["rollouts/failed"] == 1.0
    assert stats.errors == {"RuntimeError: tool backend down": 1}


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
    assert stats.as_metrics()["rollouts/timed_out"] == 1.0
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
    assert stats.retries == 3 and stats.as_metrics()["rollouts/retries"] == 3.0
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
    assert rollouts[3].status is RolloutStatus.SUCCEEDED and rollouts[3].reward is None  # returned nothing
    assert rollouts[4].reward == 1.0
    assert stats.clipped_rewards == 2 and stats.no_reward == 1
    metrics = stats.as_metrics()
    assert (metrics["rollouts/clipped_rewards"], metrics["rollouts/no_reward"], metrics["rollouts/failed"]) == (
        2.0, 1.0, 2.0
    )
    clipped = [s for s in store.get_spans(rollouts[1].rollout_id) if s.name == "reward_clipped"]
    assert "clipped to 0.0" in clipped[0].attributes["message"]


# -- calls after the attempt ended -----------------------------------------------------------------------
def test_hung_agent_calling_after_its_attempt_ended_is_refused(
    engine: TransformersEngine, tmp_path: Path
) -> None:
    """Attempt 1 hangs, times out and is retried. While attempt 2 runs, attempt 1's thread wakes and calls the
    gateway with the base URL it was lent: refused (409), and nothing is written, neither into attempt 1, which
    ended, nor into attempt 2, which the rollout-wide route would have credited. Once the rollout finished, the
    same call is refused as well."""
    store = SqliteStore(tmp_path / "store.sqlite")
    wake = threading.Event()
    late: list[BaseException] = []
    late_done = threading.Event()

    @rollout
    def agent(task, resources):
        client = openai.OpenAI(base_url=resources.llm.base_url, api_key="unused", max_retries=0)
        ask = functools.partial(client.chat.completions.create, model=engine.model_name, messages=QUESTION,
                                max_tokens=3)
        if "/attempts/1/" in resources.llm.base_url:
            wake.wait(30)  # hangs past the timeout; woken by attempt 2
            try:
                ask()
            except openai.APIStatusError as exc:
                late.append(exc)
            finally:
                late_done.set()
            return 1.0
        wake.set()
        assert late_done.wait(30)
        ask()
        return 0.5

    with serve(engine, store) as served:
        rollouts, stats = run(store, agent, tasks(1), gateway_url=served.url, timeout_s=1.0, max_attempts=2)
        [done] = rollouts
        with pytest.raises(openai.ConflictError, match="rollout already finished"):
            served.client(done.rollout_id, 1).chat.completions.create(
                model=engine.model_name, messages=QUESTION, max_tokens=3
            )
    assert (done.status, done.attempt_count, done.reward) == (RolloutStatus.SUCCEEDED, 2, 0.5)
    [refusal] = late
    assert isinstance(refusal, openai.ConflictError)
    assert "attempt 1" in refusal.message and "has ended (attempt 2 runs now)" in refusal.message
    assert [s.kind for s in store.get_spans(done.rollout_id, 1)] == [SpanKind.EXCEPTION]  # the timeout
    assert [s.kind for s in store.get_spans(done.rollout_id, 2)] == [SpanKind.LLM]  # its own call only
    assert stats.retries == 1 and stats.succeeded == 1
    store.close()


class _HeldEngine:
    """Wraps an engine so that a generation waits for ``release``: lets a test end an attempt mid-call."""

    def __init__(self, inner: TransformersEngine) -> None:
        self.inner = inner
        self.model_name, self.tokenizer, self.max_context = inner.model_name, inner.tokenizer, inner.max_context
        self.policy_version = inner.policy_version
        self.started = threading.Event()
        self.release = threading.Event()

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        self.started.set()
        await asyncio.to_thread(self.release.wait, 30)
        return await self.inner.generate(request)

    def close(self) -> None:
        """The inner engine belongs to the module fixture."""


def test_attempt_ending_while_its_call_is_served_records_nothing(engine: TransformersEngine) -> None:
    store = MemoryStore()
    start_rollouts(store, ["ro-slow", "ro-other"])
    held = _HeldEngine(engine)
    body = {"model": engine.model_name, "messages": QUESTION, "max_tokens": 2}
    with serve(held, store) as served:
        outcome: list[Any] = []
        caller = threading.Thread(target=lambda: outcome.append(served.post("/rollouts/ro-slow/attempts/1/v1/chat/"
                                                                           "completions", body)))
        caller.start()
        assert held.started.wait(30)
        store.finish_attempt("ro-slow", 1, RolloutStatus.TIMED_OUT, error="timed out (injected)")
        held.release.set()
        caller.join(30)
        error = error_of(outcome[0], 409)
        assert error["code"] == "attempt_ended" and "not recorded" in error["message"]
        assert served.post("/rollouts/ro-other/attempts/1/v1/chat/completions", body).status_code == 200
        assert len(served.service.sessions) == 1  # ro-other's; the ended attempt left none
    assert store.get_spans("ro-slow") == []
    assert [s.kind for s in store.get_spans("ro-other")] == [SpanKind.LLM]


# -- a training step that mostly failed (moved here from tests/test_grpo.py, now naming the reason) --------
@rollout
def broken_agent(task: dict, resources) -> float:
    raise ConnectionError("tool backend unreachable")


class BrokenEnv(EvenLengthEnv):
    def agent(self, mode: str):
        return broken_agent


def test_step_of_failed_rollouts_stops_the_run(tmp_path: Path, tiny_model_dir: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(envs._REGISTRY, "broken", functools.partial(BrokenEnv, n_tasks=6))
    recipe = parse_recipe({
        "name": "broken", "output_dir": str(tmp_path), "model": {"name": str(tiny_model_dir)},
        "env": {"name": "broken", "mode": "any"}, "data": {"train": "all", "val": "all"},
        "algorithm": {"name": "grpo", "max_steps": 2, "tasks_per_step": 2, "num_generations": 4,
                      "lora": {"r": 4, "alpha": 8}},
    })
    trainer = Trainer(recipe, progress=False)
    try:
        with pytest.raises(TrainingAbortedError, match=r"step 0: 8 of 8 rollouts failed .*max_failed_fraction=0.5"
                           r".*most common reasons: 8x ConnectionError: tool backend unreachable"):
            trainer.fit()
        failed = trainer.store.list_rollouts(mode="train")
    finally:
        trainer.close()
    assert len(failed) == 8 and all("tool backend unreachable" in (r.error or "") for r in failed)
    assert not (tmp_path / "broken" / "checkpoints" / "checkpoint-1").exists(), "no step trained on noise"


def test_failure_threshold_counts_failed_and_timed_out() -> None:
    stats = RunStats(succeeded=5, failed=3, timed_out=2)
    stats.errors.update({"ValueError: x": 3, "agent did not finish within timeout_s=1.0": 2})
    stats.stop_if_mostly_failed(0.5, "step 3")  # 5 of 10: not more than half
    with pytest.raises(TrainingAbortedError, match=r"step 3: 5 of 10 .* 3x ValueError: x; 2x agent did not"):
        stats.stop_if_mostly_failed(0.4, "step 3")

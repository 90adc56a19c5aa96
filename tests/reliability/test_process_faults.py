"""Process faults: ``kill -9`` of a training run in the middle of a step, then ``rltrain resume``; the engine's
worker thread dying under the gateway and under a training run.

The kill test runs the real command line in subprocesses on the tiny model, with the environment of
``gated_env.py`` holding part of step 1's rollouts so that the kill lands mid-step every time. It also leaves
what a kill during a checkpoint save leaves (a newer, incomplete checkpoint folder) for the resume to skip.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from cli_process import rltrain
from live_gateway import QUESTION, error_of, serve, start_rollouts
from safetensors.torch import load_file

from rltrain.algorithms.run_state import last_complete_checkpoint
from rltrain.engines.transformers import TransformersEngine
from rltrain.engines.vllm_server import free_port
from rltrain.metrics import read_metrics
from rltrain.recipes import parse_recipe
from rltrain.runner import TrainingAbortedError
from rltrain.store import MemoryStore, SqliteStore
from rltrain.trainer import Trainer
from rltrain.types import Rollout, RolloutStatus, SpanKind

#: generous bounds on how long a tiny-model subprocess may take; the test waits on events, not on these
PROCESS_LIMIT_S = 300
STEPS = 3


def _rltrain(*args: str, run_dir: Path) -> subprocess.Popen[str]:
    return rltrain(*args, log=run_dir.parent / f"{args[0]}.log")


def _log(run_dir: Path, command: str) -> str:
    return (run_dir.parent / f"{command}.log").read_text()


def _finished(store: SqliteStore) -> dict[str, tuple[Any, ...]]:
    """What a finished rollout is: status, reward, attempts, and its spans (ids in order)."""
    return {
        r.rollout_id: (r.status, r.reward, r.attempt_count, [s.span_id for s in store.get_spans(r.rollout_id)])
        for r in store.list_rollouts()
        if r.status.finished
    }


def _train_rollouts(store: SqliteStore, version: int) -> list[Rollout]:
    return store.list_rollouts(mode="train", resources_version=version)


def _wait_until_mid_step(proc: subprocess.Popen[str], run_dir: Path) -> None:
    """Until step 1 has exactly the 3 rollouts the gate lets through finished and the other 5 running."""
    store_path = run_dir / "store.sqlite"
    deadline = time.monotonic() + PROCESS_LIMIT_S
    store = None
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"training exited with {proc.returncode} before step 1:\n{_log(run_dir, 'train')}")
            if store is None and store_path.exists():
                store = SqliteStore(store_path)
            if store is not None:
                statuses = sorted(r.status for r in _train_rollouts(store, 1))
                if statuses == [RolloutStatus.RUNNING] * 5 + [RolloutStatus.SUCCEEDED] * 3:
                    return
            time.sleep(0.1)
        pytest.fail(f"step 1 was not reached in {PROCESS_LIMIT_S} s:\n{_log(run_dir, 'train')}")
    finally:
        if store is not None:
            store.close()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_kill_9_mid_step_then_resume_loses_and_repeats_nothing(tmp_path: Path, tiny_model_dir: Path) -> None:
    run_dir = tmp_path / "killed"
    gate = tmp_path / "gate"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "killed",
        "output_dir": str(tmp_path),
        "seed": 1,
        "model": {"name": str(tiny_model_dir), "num_threads": 1},
        "env": {"name": "gated_env:GatedEvenLengthEnv", "mode": "any",
                "options": {"n_tasks": 6, "gate": str(gate), "passing": 3}},
        "data": {"train": "all", "val": "all"},
        "runner": {"concurrency": 8, "timeout_s": 200},
        "sampling": {"train": {"temperature": 1.0, "max_tokens": 6}, "eval": {"temperature": 0.0, "max_tokens": 6}},
        "algorithm": {"name": "grpo", "max_steps": STEPS, "tasks_per_step": 2, "num_generations": 4,
                      "learning_rate": 0.05, "eval_steps": 100, "save_steps": 1, "max_completion_length": 8,
                      "lora": {"r": 4, "alpha": 8}},
    }))

    train = _rltrain("train", str(recipe), run_dir=run_dir)
    try:
        _wait_until_mid_step(train, run_dir)
    finally:
        train.send_signal(signal.SIGKILL)
        train.wait(PROCESS_LIMIT_S)
    assert train.returncode == -signal.SIGKILL

    store = SqliteStore(run_dir / "store.sqlite")
    assert store.integrity_check() == []
    finished_before = _finished(store)
    interrupted = [r.rollout_id for r in _train_rollouts(store, 1) if r.status is RolloutStatus.RUNNING]
    store.close()
    metrics_before = read_metrics(run_dir / "metrics.jsonl")
    checkpoints = run_dir / "checkpoints"
    assert last_complete_checkpoint(checkpoints) == str(checkpoints / "checkpoint-1")
    adapter_1 = _digest(checkpoints / "checkpoint-1" / "adapter_model.safetensors")
    # What a kill while saving checkpoint 2 leaves: the folder, part of the adapter, no trainer state.
    torn = checkpoints / "checkpoint-2"
    torn.mkdir()
    whole = (checkpoints / "checkpoint-1" / "adapter_model.safetensors").read_bytes()
    (torn / "adapter_model.safetensors").write_bytes(whole[: len(whole) // 2])

    gate.touch()
    resume = _rltrain("resume", str(run_dir), run_dir=run_dir)
    try:
        assert resume.wait(PROCESS_LIMIT_S) == 0, _log(run_dir, "resume")
    finally:
        resume.kill()  # a no-op once it exited

    # the store: sound, nothing left running, every rollout finished before the kill exactly as it was
    store = SqliteStore(run_dir / "store.sqlite")
    try:
        assert store.integrity_check() == []
        assert store.list_rollouts(status=RolloutStatus.QUEUED) == []
        assert store.list_rollouts(status=RolloutStatus.RUNNING) == []
        finished_after = _finished(store)
        assert {rid: finished_after[rid] for rid in finished_before} == finished_before
        assert {store.get_rollout(rid).status for rid in interrupted} == {RolloutStatus.CANCELLED}
        by_version = {v: sorted(r.status for r in _train_rollouts(store, v)) for v in range(STEPS)}
        llm_versions = {
            s.attributes["policy_version"]
            for r in _train_rollouts(store, 2) for s in store.get_spans(r.rollout_id) if s.kind is SpanKind.LLM
        }
    finally:
        store.close()
    succeeded, cancelled = RolloutStatus.SUCCEEDED, RolloutStatus.CANCELLED
    assert by_version == {
        0: [succeeded] * 8,  # step 0 was not sampled again
        1: [cancelled] * 5 + [succeeded] * (3 + 8),  # the interrupted step, then the step again in full
        2: [succeeded] * 8,
    }
    assert llm_versions == {2}, "the step count continued: step 2 was sampled by policy version 2"

    # the metrics: each step's lines once, the lines written before the kill kept as they were
    records = read_metrics(run_dir / "metrics.jsonl")
    assert records[: len(metrics_before)] == metrics_before
    assert [r["step"] for r in records if r.get("event") == "rollouts"] == [1, 2, 3]
    assert [r["step"] for r in records if r.get("event") == "train" and "loss" in r] == [1, 2, 3]
    assert [r.get("event") for r in records].count("baseline") == 1
    assert [r.get("event") for r in records].count("done") == 1

    # the checkpoints: the old one untouched, the torn one skipped and then written whole, the step count on
    assert _digest(checkpoints / "checkpoint-1" / "adapter_model.safetensors") == adapter_1
    assert last_complete_checkpoint(checkpoints) == str(checkpoints / f"checkpoint-{STEPS}")
    for step in range(1, STEPS + 1):
        folder = checkpoints / f"checkpoint-{step}"
        assert json.loads((folder / "trainer_state.json").read_text())["global_step"] == step
        assert load_file(str(folder / "adapter_model.safetensors")), f"checkpoint-{step} adapter loads"


# -- the engine's worker thread dying ------------------------------------------------------------------------
def _crash_worker(self: TransformersEngine) -> None:
    """In place of the worker's step that admits queued rows: an error outside a batch's decode kills the thread."""
    raise RuntimeError("injected: decode thread crashed")


def test_engine_worker_death_is_a_503_naming_the_reason(
    tiny_engine: TransformersEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker thread dies while serving a request: that request, and every later one, is answered at once
    with 503 and the reason; nothing is recorded; the gateway itself keeps answering."""
    store = MemoryStore()
    start_rollouts(store, ["ro-a", "ro-b"])
    monkeypatch.setattr(tiny_engine, "_admit", _crash_worker.__get__(tiny_engine))
    body = {"model": tiny_engine.model_name, "messages": QUESTION, "max_tokens": 2}
    with serve(tiny_engine, store) as served:
        for rollout_id in ("ro-a", "ro-b"):
            error = error_of(served.post(f"/rollouts/{rollout_id}/attempts/1/v1/chat/completions", body), 503)
            assert error["type"] == "engine_unavailable"
            assert "worker thread died (RuntimeError: injected: decode thread crashed)" in error["message"]
        assert httpx.get(f"{served.url}/health").status_code == 200
    assert tiny_engine.failure == "RuntimeError: injected: decode thread crashed"
    assert store.get_spans("ro-a") == [] and store.get_spans("ro-b") == []


def test_engine_death_mid_training_stops_the_run_with_the_reason(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine's worker dies once step 0 trained: step 1's rollouts fail fast with 503s, and the run stops
    with the engine's reason before any optimiser step on them."""
    admit = TransformersEngine._admit

    def crash_after_step_0(self: TransformersEngine) -> None:
        if self.policy_version >= 1:
            _crash_worker(self)
        admit(self)

    monkeypatch.setattr(TransformersEngine, "_admit", crash_after_step_0)
    recipe = parse_recipe({
        "name": "engine-dies", "output_dir": str(tmp_path), "model": {"name": str(tiny_model_dir)},
        "env": {"name": "even_length_env:EvenLengthEnv", "mode": "any", "options": {"n_tasks": 4}},
        "data": {"train": "all", "val": "all"}, "runner": {"timeout_s": 120},
        "sampling": {"train": {"temperature": 1.0, "max_tokens": 4}, "eval": {"max_tokens": 4}},
        "algorithm": {"name": "grpo", "max_steps": 3, "tasks_per_step": 2, "num_generations": 4,
                      "eval_steps": 100, "save_steps": 1, "lora": {"r": 4, "alpha": 8}},
    })
    trainer = Trainer(recipe, progress=False)
    try:
        with pytest.raises(TrainingAbortedError, match=r"step 1: 8 of 8 rollouts failed .*most common reasons: "
                           r"8x .*503.*worker thread died \(RuntimeError: injected: decode thread crashed\)"):
            trainer.fit()
    finally:
        trainer.close()
    checkpoints = tmp_path / "engine-dies" / "checkpoints"
    assert last_complete_checkpoint(checkpoints) == str(checkpoints / "checkpoint-1")
    assert not (checkpoints / "checkpoint-2").exists(), "no step trained on the failed rollouts"


def test_sigterm_stops_the_vllm_server_the_command_started(tmp_path: Path, tiny_model_dir: Path) -> None:
    """``kill PID`` of an rltrain command ends it like Ctrl-C: its finally blocks run and the vLLM server it started
    (here the vLLM-compatible fake, as a program) is stopped with it, not left holding ~4 GB on a CPU machine."""
    fake = Path(__file__).resolve().parent.parent / "fake_vllm.py"
    recipe = tmp_path / "serve.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "served", "output_dir": str(tmp_path), "model": {"name": str(tiny_model_dir)},
        "engine": {"kind": "vllm", "vllm": {"command": f"{sys.executable} {fake}", "startup_timeout_s": 120}},
    }))
    launched = tmp_path / "argv.json"
    log = tmp_path / "serve.log"
    proc = rltrain("serve", str(recipe), "--port", str(free_port()), log=log,
                   extra_env={"FAKE_VLLM_ARGV_FILE": str(launched)}, no_progress=False)
    try:
        deadline = time.monotonic() + PROCESS_LIMIT_S
        while "serving" not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"rltrain serve did not come up (exit {proc.returncode}):\n{log.read_text()}")
            time.sleep(0.2)
        server_pid = json.loads(launched.read_text())["pid"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=PROCESS_LIMIT_S) == 128 + signal.SIGTERM
        with pytest.raises(ProcessLookupError):
            os.kill(server_pid, 0)
    finally:
        if proc.poll() is None:
            proc.kill()
        if launched.exists():  # a server the command failed to stop must not outlive the test either
            with contextlib.suppress(ProcessLookupError):
                os.kill(json.loads(launched.read_text())["pid"], signal.SIGKILL)

"""Resume is idempotent: a run killed (``SIGKILL``) at each point of its life and resumed each time ends with
every metric line written exactly once, trains exactly ``max_steps`` steps, and a finished run resumed does
nothing. One run directory goes through the whole chain, each process dying somewhere else (see
``kill_env.py``): baseline, sampling, optimiser step, checkpoint save, final validation.
"""

from __future__ import annotations

import hashlib
import json
import signal
from collections import Counter
from pathlib import Path

import yaml
from cli_process import rltrain
from kill_env import FILLER, KILL_AT

from rltrain.algorithms.run_state import last_complete_checkpoint
from rltrain.metrics import read_metrics
from rltrain.store import SqliteStore
from rltrain.types import RolloutStatus

#: a generous bound on one tiny-model process; the test waits on the process, not on this
PROCESS_LIMIT_S = 300
STEPS = 3


def _recipe(tmp_path: Path, tiny_model_dir: Path, output_dir: Path | None = None) -> Path:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "chain", "output_dir": str(output_dir or tmp_path), "seed": 3,
        "model": {"name": str(tiny_model_dir), "num_threads": 1},
        "env": {"name": "kill_env:KillingEvenLengthEnv", "mode": "any", "options": {"n_tasks": 4}},
        "data": {"train": "train", "val": "val-a", "extra_eval": ["val-b"]},
        "runner": {"concurrency": 4, "timeout_s": 200},
        "sampling": {"train": {"temperature": 1.0, "max_tokens": 4}, "eval": {"temperature": 0.0, "max_tokens": 4}},
        "algorithm": {"name": "grpo", "max_steps": STEPS, "tasks_per_step": 2, "num_generations": 4,
                      "learning_rate": 0.05, "eval_steps": 2, "save_steps": 1, "max_completion_length": 6,
                      "lora": {"r": 4, "alpha": 8}},
    }))
    return recipe


def _run(tmp_path: Path, number: int, *args: str, kill_at: str = "", env: dict[str, str] | None = None) -> int:
    log = tmp_path / f"{number}-{args[0]}-{kill_at or 'whole'}.log"
    proc = rltrain(*args, log=log, extra_env={KILL_AT: kill_at, **(env or {})})
    try:
        return proc.wait(PROCESS_LIMIT_S)
    finally:
        proc.kill()  # a no-op once it exited


def _lines(records: list[dict]) -> Counter:
    """Each metric line as (event, step, what it measures): the lines that must appear once."""
    keys = []
    for r in records:
        measured = tuple(sorted(k for k in r if "/" in k and not k.startswith("train/answer")))[:1]
        keys.append((r.get("event"), r.get("step"), measured))
    return Counter(keys)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_killed_at_every_point_then_resumed_each_line_once_and_no_step_more(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    recipe = _recipe(tmp_path, tiny_model_dir)
    run_dir = tmp_path / "chain"
    chain = [
        ("train", "baseline"),       # mid-baseline: one of its two lines written
        ("resume", "sampling:1"),    # checkpoint 1 written, step 2's rollouts half done
        ("resume", "optimiser:1"),   # step 2 sampled and its rollouts line written, killed in the optimiser step
        ("resume", "save:2"),        # step 2 trained and logged, killed while checkpoint 2 is written
        ("resume", f"final:{STEPS}"),  # every step trained, killed after the final validation's first line
    ]
    for number, (command, kill_at) in enumerate(chain):
        target = str(recipe) if command == "train" else str(run_dir)
        code = _run(tmp_path, number, command, target, kill_at=kill_at)
        assert code == -signal.SIGKILL, f"{command} meant to die at {kill_at} exited {code}"
    assert _run(tmp_path, 5, "resume", str(run_dir)) == 0, (tmp_path / "5-resume-whole.log").read_text()

    records = read_metrics(run_dir / "metrics.jsonl")
    events = [r.get("event") for r in records]
    assert [r["step"] for r in records if r.get("event") == "rollouts"] == [1, 2, 3]
    assert [r["step"] for r in records if r.get("event") == "train" and "loss" in r] == [1, 2, 3]
    assert events.count("baseline") == 2, "both validation sets, once each"
    assert events.count("val-step2") == 2
    assert events.count(f"val-step{STEPS}") == 2
    assert events.count("done") == 1 and events[-1] == "done"
    assert [k for k, n in _lines(records).items() if n > 1] == [], "a metric line written twice"
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == [f"checkpoint-{s}" for s in range(1, STEPS + 1)]
    assert last_complete_checkpoint(checkpoints) == str(checkpoints / f"checkpoint-{STEPS}")
    store = SqliteStore(run_dir / "store.sqlite")
    try:
        assert store.integrity_check() == []
        assert store.list_rollouts(status=RolloutStatus.RUNNING) == []
    finally:
        store.close()

    # a finished run, resumed: says so, trains nothing, writes nothing
    before = {p: _digest(p) for p in [run_dir / "metrics.jsonl", *sorted((run_dir / "final").iterdir())]}
    assert _run(tmp_path, 6, "resume", str(run_dir)) == 0
    assert "finished already" in (tmp_path / "6-resume-whole.log").read_text()
    assert {p: _digest(p) for p in before} == before
    assert not (checkpoints / f"checkpoint-{STEPS + 1}").exists()
    assert json.loads((checkpoints / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())["global_step"] == STEPS


def test_disk_full_while_a_checkpoint_is_saved_then_resume(tmp_path: Path, tiny_model_dir: Path, small_disk: Path) -> None:
    """The disk fills up right before checkpoint 2 is written (a real ENOSPC, on a 16 MB tmpfs): the run stops
    with one error naming it, exit 2; resuming on the still-full disk says the same; once space is freed, resume
    finishes the run with every metric line once."""
    recipe = _recipe(tmp_path, tiny_model_dir, output_dir=small_disk)
    run_dir = small_disk / "chain"
    filler = small_disk / "filler"
    assert _run(tmp_path, 0, "train", str(recipe), kill_at="fill:2", env={FILLER: str(filler)}) == 2
    resumed_full = _run(tmp_path, 1, "resume", str(run_dir))
    filler.unlink()
    for log in sorted(tmp_path.glob("[01]-*.log")):
        text = log.read_text()
        assert "Traceback" not in text and ("No space left on device" in text or "disk is full" in text), text
    assert resumed_full == 2
    assert _run(tmp_path, 2, "resume", str(run_dir)) == 0, (tmp_path / "2-resume-whole.log").read_text()
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records if r.get("event") == "rollouts"] == [1, 2, 3]
    assert [k for k, n in _lines(records).items() if n > 1] == [], "a metric line written twice"
    assert [r.get("event") for r in records].count("done") == 1
    assert last_complete_checkpoint(run_dir / "checkpoints") == str(run_dir / "checkpoints" / f"checkpoint-{STEPS}")

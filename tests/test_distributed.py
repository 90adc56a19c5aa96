"""Two training processes under ``accelerate launch`` on the CPU (torch DDP over gloo), against one process.

The same recipe runs once as one process and once as two: the main rank samples each step's rows through the
gateway (the agent seeds its calls, so both runs sample the same tokens) and broadcasts them; each rank trains on
its half and accelerate averages the gradients. Both runs must log one line per step, save one checkpoint per
save, keep the LoRA replicas identical on both ranks (``dist/replica_max_diff``), and reach the same loss and
the same weights as the one-process run within float tolerance. A two-process ``rltrain resume`` of a run cut
after its first checkpoint must produce the step it lost again.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rltrain.metrics import read_metrics

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
ACCELERATE = Path(sys.executable).with_name("accelerate")
#: float tolerance of the comparisons: the two runs sum the same gradients in a different order (1e-8 apart), and
#: Adam's first steps divide by the root of tiny second moments, which shows those differences at ~1e-5 in weights
TOLERANCE = 1e-4


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(processes: int, *cli_args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    """``rltrain <cli_args>`` as ``processes`` training processes (one: a plain process, no launcher); with
    ``ok`` it must succeed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)]), "OMP_NUM_THREADS": "1",
           "TRL_EXPERIMENTAL_SILENCE": "1"}
    entry = ["-m", "rltrain.cli", *cli_args, "--no-progress"]
    if processes == 1:
        command = [sys.executable, *entry]
    else:
        # `--cpu` would run one process (accelerate spreads CPU processes with mpirun only); `--multi_gpu` starts
        # them with torchrun, and with no GPU visible accelerate joins them over gloo (MULTI_CPU), as DDP would
        env["CUDA_VISIBLE_DEVICES"] = ""
        command = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines",
                   "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                   str(_free_port()), *entry]
    done = subprocess.run(command, check=False, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if ok:
        assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done


def write_recipe(folder: Path, model_dir: Path, name: str, algorithm: str,
                 agent: str = "seeded_even_length_agent") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tasks.jsonl").write_text("".join(json.dumps({"id": f"w{i}", "word": f"word{i}"}) + "\n"
                                                for i in range(4)))
    (folder / "val.jsonl").write_text("".join(json.dumps({"id": f"w{i}", "word": f"word{i}"}) + "\n"
                                              for i in range(2)))
    extra = ", critic: {learning_rate: 0.01}" if algorithm == "ppo" else ""
    recipe = folder / f"{name}.yaml"
    recipe.write_text(
        f"name: {name}\noutput_dir: {folder / 'runs'}\nseed: 1\n"
        f"agent: seeded_parity_agent:{agent}\n"
        f"model: {{name: {model_dir}}}\nprompts: {{user: 'Repeat {{word}}.'}}\n"
        "data: {train: tasks.jsonl, val: val.jsonl}\nrunner: {concurrency: 1}\n"
        "sampling: {train: {temperature: 1.0, max_tokens: 6}, eval: {temperature: 0.0, max_tokens: 4}}\n"
        f"algorithm: {{name: {algorithm}, max_steps: 2, tasks_per_step: 2, num_generations: 2, "
        "learning_rate: 0.05, eval_steps: 10, save_steps: 1, max_completion_length: 8, "
        f"lora: {{r: 4, alpha: 8}}{extra}}}\n"
    )
    return recipe


def lora(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"checkpoint-{step}" / "adapter_model.safetensors"))


def max_weight_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def losses(run: Path) -> list[tuple[float, float]]:
    """Each step's loss and gradient norm (GRPO's first loss is ~0 by construction; the gradient is not)."""
    return [(r["loss"], r["grad_norm"]) for r in read_metrics(run / "metrics.jsonl")
            if r.get("event") == "train" and "loss" in r]


def one_and_two(tmp_path: Path, model_dir: Path, algorithm: str) -> tuple[Path, Path]:
    """The same recipe trained by one process and by two; their run directories."""
    runs = []
    for processes in (1, 2):
        name = f"{algorithm}-{processes}p"
        launch(processes, "train", str(write_recipe(tmp_path, model_dir, name, algorithm)))
        runs.append(tmp_path / "runs" / name)
    return runs[0], runs[1]


def check_two_processes(single: Path, double: Path) -> None:
    records = read_metrics(double / "metrics.jsonl")
    sampled = [r["step"] for r in records if r.get("event") == "rollouts"]
    assert len(sampled) == 2 and sampled == [r["step"] for r in read_metrics(single / "metrics.jsonl")
                                             if r.get("event") == "rollouts"]  # one line per step, not per rank
    assert [r["step"] for r in records if r.get("event") == "train" and "loss" in r] == [1, 2]
    replicas = [r for r in records if r.get("event") == "replicas"]
    assert [r["step"] for r in replicas] == [1, 2]
    assert all(r["dist/replica_max_diff"] == 0.0 and r["dist/world_size"] == 2 for r in replicas)
    assert [r["dist/world_size"] for r in records if r.get("event") == "done"] == [2]
    assert sorted(p.name for p in (double / "checkpoints").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert (double / "final" / "adapter_model.safetensors").exists()
    assert (double / "checkpoints" / "checkpoint-2" / "rng_state_1.pth").exists()  # each rank's RNG is kept
    # the same global batch gives the same update
    for (loss_1, norm_1), (loss_2, norm_2) in zip(losses(single), losses(double), strict=True):
        assert loss_2 == pytest.approx(loss_1, abs=TOLERANCE) and norm_2 == pytest.approx(norm_1, abs=TOLERANCE)
    for step in (1, 2):
        assert max_weight_diff(lora(single, step), lora(double, step)) < TOLERANCE
    assert max_weight_diff(lora(single, 1), lora(single, 2)) > 100 * TOLERANCE, "training must move the weights"


def test_grpo_on_two_processes_equals_one_and_resumes(tmp_path: Path, tiny_model_dir: Path) -> None:
    single, double = one_and_two(tmp_path, tiny_model_dir, "grpo")
    check_two_processes(single, double)

    # cut the two-process run after its first checkpoint, then resume it with two processes
    trained = lora(double, 2)
    shutil.rmtree(double / "checkpoints" / "checkpoint-2")
    shutil.rmtree(double / "final")
    metrics_file = double / "metrics.jsonl"  # a run cut before its end has no `done` line (else resume does nothing)
    metrics_file.write_text("".join(json.dumps(r) + "\n" for r in read_metrics(metrics_file) if r.get("event") != "done"))
    resumed_at = time.time()
    launch(2, "resume", str(double))
    assert max_weight_diff(trained, lora(double, 2)) < TOLERANCE  # the lost step, trained again
    resumed = [r for r in read_metrics(double / "metrics.jsonl") if r["time"] >= resumed_at]
    assert len([r for r in resumed if r.get("event") == "rollouts"]) == 1  # one line, not one per rank
    assert [r["step"] for r in resumed if r.get("event") == "train" and "loss" in r] == [2]
    assert [r["step"] for r in resumed if r.get("event") == "replicas"] == [2]
    whole = read_metrics(metrics_file)  # and in the whole file, each step's lines once
    assert [r["step"] for r in whole if r.get("event") == "rollouts"] == [1, 2]
    assert [r["step"] for r in whole if r.get("event") == "done"] == [2]


def test_ppo_on_two_processes_equals_one(tmp_path: Path, tiny_model_dir: Path) -> None:
    single, double = one_and_two(tmp_path, tiny_model_dir, "ppo")
    check_two_processes(single, double)
    for step in (1, 2):
        critic = "critic.safetensors"
        a = load_file(str(single / "checkpoints" / f"checkpoint-{step}" / critic))
        b = load_file(str(double / "checkpoints" / f"checkpoint-{step}" / critic))
        assert max_weight_diff(a, b) < TOLERANCE  # the critic's gradients are averaged across ranks too


def test_when_the_main_process_fails_the_other_stops(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Rank 0 raises while sampling (every rollout failed) as rank 1 waits for its rows: the launch ends with
    rank 0's error instead of hanging, and nothing past the failure is written."""
    recipe = write_recipe(tmp_path, tiny_model_dir, "broken", "grpo", agent="broken_agent")
    done = launch(2, "train", str(recipe), ok=False)
    assert done.returncode != 0
    said = " ".join((done.stdout + done.stderr).split())  # rich wraps the logged error
    assert "step 0:" in said and "rollouts failed or timed out" in said
    run = tmp_path / "runs" / "broken"
    assert not list(run.glob("checkpoints/checkpoint-*"))
    assert [r for r in read_metrics(run / "metrics.jsonl") if r.get("event") in ("train", "done")] == []

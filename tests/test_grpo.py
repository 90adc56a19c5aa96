"""GRPO end to end on a tiny model: agents -> gateway -> adapter rows -> TRL GRPOTrainer + PEFT LoRA.

The environment is the small one in ``tests/even_length_env.py``: its agent is a real ``@rollout`` program using
the stock ``openai`` client against the gateway, and its reward depends on what the model sampled, so groups have
reward spread and the LoRA weights must move.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from even_length_env import EvenLengthEnv
from safetensors.torch import load_file

from rltrain import envs
from rltrain.metrics import EvalSummary, read_metrics
from rltrain.recipes import Recipe, parse_recipe
from rltrain.store import SqliteStore
from rltrain.trainer import Trainer
from rltrain.types import SpanKind


@pytest.fixture(autouse=True)
def parity_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registered for these tests only, so the registry other tests see is untouched."""
    monkeypatch.setitem(envs._REGISTRY, "parity", functools.partial(EvenLengthEnv, n_tasks=6))


def grpo_recipe(tmp_path: Path, model_dir: Path, max_steps: int):
    return parse_recipe({
        "name": "grpo-tiny",
        "output_dir": str(tmp_path),
        "seed": 1,
        "model": {"name": str(model_dir)},
        "env": {"name": "parity", "mode": "any"},
        "data": {"train": "all", "val": "all"},
        "runner": {"concurrency": 8},
        "sampling": {"train": {"temperature": 1.0, "max_tokens": 6}, "eval": {"temperature": 0.0, "max_tokens": 6}},
        "algorithm": {"name": "grpo", "max_steps": max_steps, "tasks_per_step": 2, "num_generations": 4,
                      "learning_rate": 0.05, "eval_steps": 2, "save_steps": 1, "max_completion_length": 8,
                      "lora": {"r": 4, "alpha": 8}},
    })


def fit(recipe: Recipe, resume: bool = False) -> None:
    trainer = Trainer(recipe, progress=False)
    try:
        trainer.fit(resume=resume)
    finally:
        trainer.close()


def lora_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


def test_grpo_steps_change_lora_checkpoint_and_resume(tmp_path: Path, tiny_model_dir: Path) -> None:
    fit(grpo_recipe(tmp_path, tiny_model_dir, max_steps=2))
    run = tmp_path / "grpo-tiny"
    ckpt1, ckpt2 = run / "checkpoints" / "checkpoint-1", run / "checkpoints" / "checkpoint-2"
    for ckpt in (ckpt1, ckpt2):
        assert (ckpt / "adapter_model.safetensors").exists()
        assert (ckpt / "optimizer.pt").exists() and (ckpt / "trainer_state.json").exists()
    w1, w2 = lora_weights(ckpt1), lora_weights(ckpt2)
    assert w1.keys() == w2.keys()
    assert any(not torch.equal(w1[k], w2[k]) for k in w1), "the optimiser step must change the LoRA weights"
    lora_b = [v for k, v in w2.items() if "lora_B" in k]
    assert any(v.abs().sum() > 0 for v in lora_b), "LoRA B starts at zero; training must move it"

    records = read_metrics(run / "metrics.jsonl")
    rollouts = [r for r in records if r.get("event") == "rollouts"]
    assert [r["step"] for r in rollouts] == [1, 2]
    assert all(r["rollouts/succeeded"] == 8 for r in rollouts)
    assert all("train/frac_zero_std_groups" in r and "adapter/llm_calls" in r for r in rollouts)
    train_logs = [r for r in records if r.get("event") == "train" and "loss" in r]
    assert len(train_logs) == 2
    assert [r["shared_prompt/rows_per_pass"] for r in train_logs] == [4.0, 4.0], "2 groups of 4 in one pass"
    assert (run / "plot.png").exists() and (run / "final" / "adapter_config.json").exists()
    # the spans say which policy version sampled them
    store = SqliteStore(run / "store.sqlite")
    versions = {
        s.attributes["policy_version"]
        for r in store.list_rollouts(mode="train")
        for s in store.get_spans(r.rollout_id)
        if s.kind is SpanKind.LLM
    }
    store.close()
    assert versions == {0, 1}

    # resume with a longer budget: continues from step 2, does not redo steps 1-2
    fit(grpo_recipe(tmp_path, tiny_model_dir, max_steps=3), resume=True)
    state = json.loads((run / "checkpoints" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    records = read_metrics(run / "metrics.jsonl")
    steps = [r["step"] for r in records if r.get("event") == "rollouts"]
    assert steps == [1, 2, 3], "resume must not sample finished steps again"


def test_zero_signal_step_is_reported(tmp_path: Path, tiny_model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    recipe = grpo_recipe(tmp_path, tiny_model_dir, max_steps=1)
    recipe.sampling.train = recipe.sampling.train.model_copy(update={"temperature": 0.0})
    fit(recipe)
    [rollouts] = [r for r in read_metrics(tmp_path / "grpo-tiny" / "metrics.jsonl") if r.get("event") == "rollouts"]
    assert rollouts["train/frac_zero_std_groups"] == 1.0
    assert "no learning signal" in caplog.text


def test_micro_batches_accumulate_into_one_step_per_generation(tmp_path: Path, tiny_model_dir: Path) -> None:
    """8 rows a step in micro-batches of 4: one sampling round and one optimiser step per step, not two."""
    recipe = grpo_recipe(tmp_path, tiny_model_dir, max_steps=2)
    recipe.algorithm = recipe.algorithm.model_copy(update={"micro_batch_size": 4})
    fit(recipe)
    run = tmp_path / "grpo-tiny"
    args = torch.load(run / "checkpoints" / "checkpoint-2" / "training_args.bin", weights_only=False)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (4, 2)
    records = read_metrics(run / "metrics.jsonl")
    rollouts = [r for r in records if r.get("event") == "rollouts"]
    assert [(r["step"], r["rollouts/succeeded"]) for r in rollouts] == [(1, 8), (2, 8)]
    train_logs = [r for r in records if r.get("event") == "train" and "loss" in r]
    assert len(train_logs) == 2
    # each micro-batch holds one whole group (TRL's shuffle would mix the two), so each prompt runs once per 4 rows
    assert [r["shared_prompt/rows_per_pass"] for r in train_logs] == [4.0, 4.0]
    w1, w2 = (lora_weights(run / "checkpoints" / f"checkpoint-{n}") for n in (1, 2))
    assert any(not torch.equal(w1[k], w2[k]) for k in w1)


def test_micro_batch_must_divide_the_step(tmp_path: Path, tiny_model_dir: Path) -> None:
    recipe = grpo_recipe(tmp_path, tiny_model_dir, max_steps=1).model_dump()
    recipe["algorithm"]["micro_batch_size"] = 3
    with pytest.raises(ValueError, match=r"micro_batch_size=3 must divide .* = 8"):
        parse_recipe(recipe)


def test_flat_groups_are_resampled_with_new_tasks(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Greedy sampling makes every group flat; `resample_with: new_task` re-runs them on tasks not in the step."""
    recipe = grpo_recipe(tmp_path, tiny_model_dir, max_steps=1)
    recipe.sampling.train = recipe.sampling.train.model_copy(update={"temperature": 0.0})
    recipe.algorithm = recipe.algorithm.model_copy(update={"resample_zero_std": 2, "resample_with": "new_task"})
    fit(recipe)
    store = SqliteStore(tmp_path / "grpo-tiny" / "store.sqlite")
    try:
        train = sorted(store.list_rollouts(mode="train"), key=lambda r: r.created_at)
    finally:
        store.close()
    assert len(train) == 3 * 8, "the step's 2 groups of 4, then 2 re-runs of both"
    rounds = [{r.task.id for r in train[k:k + 8]} for k in (0, 8, 16)]
    assert all(len(ids) == 2 for ids in rounds)
    assert rounds[0].isdisjoint(rounds[1]) and rounds[0].isdisjoint(rounds[2]) and rounds[1].isdisjoint(rounds[2])


def test_the_adapter_reported_is_the_one_chosen_on_the_selection_set(tmp_path: Path, tiny_model_dir: Path) -> None:
    """With data.select, every validation also scores the selection set; best/ is the adapter that scored highest
    on it (the fresh adapter, step 0, included) and fit() reports that adapter's validation, not the last one's."""
    recipe = grpo_recipe(tmp_path, tiny_model_dir, max_steps=2)
    recipe.data = recipe.data.model_copy(update={"select": "selection"})
    recipe.algorithm = recipe.algorithm.model_copy(update={"eval_steps": 1})
    trainer = Trainer(recipe, progress=False)
    try:
        reported = trainer.fit()
    finally:
        trainer.close()
    run = tmp_path / "grpo-tiny"
    by_step = {step: [EvalSummary.model_validate(s) for s in json.loads((run / "eval" / f"{label}.json").read_text())]
               for step, label in [(0, "baseline"), (1, "val-step1"), (2, "val-step2")]}
    assert all([s.task_set for s in summaries] == ["all", "selection"] for summaries in by_step.values())
    selection = {step: summaries[1].accuracy for step, summaries in by_step.items()}
    marker = json.loads((run / "best" / "rltrain_best.json").read_text())
    first_best = max(selection, key=lambda step: (selection[step], -step))  # ties keep the earlier adapter
    assert (marker["task_set"], marker["step"], marker["accuracy"]) == ("selection", first_best, selection[first_best])
    assert reported == by_step[first_best]

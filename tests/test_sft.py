"""The warm start on a tiny model: demonstrations -> rows -> TRL SFTTrainer + PEFT LoRA, alone or before GRPO.

Two environments: room selection (its teacher agent sends the solver's answer through the gateway) and a small
one made here whose reward depends on what the model sampled, so that rejection sampling keeps some rollouts
and drops others.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from even_length_env import EvenLengthEnv
from safetensors.torch import load_file

from rltrain import envs
from rltrain.algorithms.sft import WARM_START_DIR, build_sft_trainer, collect_demonstrations, train_sft
from rltrain.metrics import read_metrics
from rltrain.models import load_model_and_tokenizer
from rltrain.recipes import LoraConfig, RecipeError, WarmStartConfig, parse_recipe
from rltrain.serving import ServingStack
from rltrain.store import SqliteStore
from rltrain.trainer import Trainer
from rltrain.types import LLMCallRecord, SpanKind, Trajectory


@pytest.fixture(autouse=True)
def even_length_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registered for these tests only, so the registry other tests see is untouched."""
    monkeypatch.setitem(envs._REGISTRY, "even_length", EvenLengthEnv)

SAMPLING = {"train": {"temperature": 1.0, "max_tokens": 6}, "eval": {"temperature": 0.0, "max_tokens": 6}}
ROOM_SAMPLING = {"train": {"temperature": 1.0, "max_tokens": 4}, "eval": {"temperature": 0.0, "max_tokens": 4}}


def even_recipe(tmp_path: Path, model_dir: Path, **sections: object):
    return parse_recipe({
        "name": "even", "output_dir": str(tmp_path), "seed": 3, "model": {"name": str(model_dir)},
        "env": {"name": "even_length", "mode": "any"}, "data": {"train": "all", "val": "all"},
        "runner": {"concurrency": 8}, "sampling": SAMPLING, **sections,
    })


def room_recipe(tmp_path: Path, model_dir: Path, **sections: object):
    return parse_recipe({
        "name": "rooms", "output_dir": str(tmp_path), "seed": 3, "model": {"name": str(model_dir)},
        "env": {"name": "room_selection", "mode": "inline"},
        "data": {"train": "public:train", "val": "public:val", "limit": 3},
        "runner": {"concurrency": 4}, "sampling": ROOM_SAMPLING, **sections,
    })


def lora_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


def llm_record(store, rollout_id: str) -> LLMCallRecord:
    [span] = [s for s in store.get_spans(rollout_id) if s.kind is SpanKind.LLM]
    return LLMCallRecord.model_validate(span.attributes)


def test_rejection_sampled_sft_trains_only_assistant_tokens_of_rewarded_rollouts(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    config = WarmStartConfig(sources=["self"], samples_per_task=4, batch_size=4, max_steps=2, learning_rate=0.05)
    trainer = Trainer(even_recipe(tmp_path, tiny_model_dir), progress=False)
    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir))
    try:
        with ServingStack(trainer.recipe, trainer.store, model=model, tokenizer=tokenizer) as stack:
            rows, metrics = collect_demonstrations(trainer.run, stack, config)
        rollouts = trainer.store.list_rollouts(mode="warm_start")
        assert len(rollouts) == 16 == metrics["warm_start/self/collected"]
        rewarded = {r.rollout_id for r in rollouts if r.reward == 1.0}
        assert 0 < len(rewarded) < 16, "the test needs both rewarded and unrewarded samples"
        assert {row.rollout_id for row in rows} == rewarded and len(rows) == metrics["warm_start/self/kept"]
        for row in rows:  # the tokens are the recorded ones, the policy's tokens are exactly the sampled ones
            record = llm_record(trainer.store, row.rollout_id)
            assert (row.prompt_ids, row.completion_ids) == (record.prompt_ids, record.completion_ids)
            assert row.env_mask == [1] * len(record.completion_ids)

        sft, _ = build_sft_trainer(model, tokenizer, rows, config, LoraConfig(r=4, alpha=8), tmp_path / "sft",
                                   seed=3, progress=False)
        # What TRL trains on: labels are the sampled tokens, -100 on every prompt (and padding) position.
        by_ids = {tuple(r.prompt_ids + r.completion_ids): r for r in rows}
        for example in sft.train_dataset:
            row = by_ids[tuple(example["input_ids"])]
            assert example["labels"] == [-100] * len(row.prompt_ids) + row.completion_ids
        batch = next(iter(sft.get_train_dataloader()))
        for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), strict=True):
            row = next(r for key, r in by_ids.items() if ids[: len(key)] == list(key))
            trained = [token for token in labels if token != -100]
            assert trained == row.completion_ids

        base, _ = load_model_and_tokenizer(str(tiny_model_dir))  # the one above now carries that trainer's adapter
        result = train_sft(base, tokenizer, rows, config, LoraConfig(r=4, alpha=8), tmp_path / "sft", seed=3,
                           progress=False)
    finally:
        trainer.close()
    assert result.steps == 2
    weights = lora_weights(tmp_path / "sft")
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b), "LoRA B starts at zero; SFT must move it"


def test_teacher_demonstrations_are_tokenised_by_the_gateway_like_any_rollout(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    from rltrain.envs.room_selection.solver import solve
    from rltrain.envs.room_selection.tasks import request_of

    trainer = Trainer(room_recipe(tmp_path, tiny_model_dir), progress=False)
    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir))
    try:
        with ServingStack(trainer.recipe, trainer.store, model=model, tokenizer=tokenizer) as stack:
            rows, metrics = collect_demonstrations(trainer.run, stack, WarmStartConfig())
            tasks = trainer.run.load_tasks("public:train")
            trainer.run.evaluate({"inline": tasks}, stack=stack, label="inline")  # the student's own requests
        teacher = trainer.store.list_rollouts(mode="warm_start")
        student = {r.task.id: r for r in trainer.store.list_rollouts(mode="eval")}
        assert metrics["warm_start/teacher/kept"] == 3 == len(rows) == len(teacher)
        expected = {t.id: solve(request_of(t.payload), trainer.run.env.catalog) for t in tasks}
        assert metrics["warm_start/teacher/answer_distribution"] == {
            answer: list(expected.values()).count(answer) / 3 for answer in set(expected.values())
        }
        for rollout, row in zip(teacher, rows, strict=True):
            record = llm_record(trainer.store, rollout.rollout_id)
            assert record.teacher and not llm_record(trainer.store, student[rollout.task.id].rollout_id).teacher
            # the same prompt tokens the inline agent's request gets, and the solver's answer after the prefix
            assert record.prompt_ids == llm_record(trainer.store, student[rollout.task.id].rollout_id).prompt_ids
            assert tokenizer.decode(record.completion_ids) == f" {expected[rollout.task.id]}<|im_end|>"
            assert (row.prompt_ids, row.completion_ids) == (record.prompt_ids, record.completion_ids)
            assert row.env_mask == [1] * len(record.completion_ids) and rollout.reward == 1.0
    finally:
        trainer.close()


def test_sft_run_end_to_end_writes_adapters_and_metrics(tmp_path: Path, tiny_model_dir: Path) -> None:
    recipe = room_recipe(tmp_path, tiny_model_dir, algorithm={
        "name": "sft", "max_steps": 2, "batch_size": 2, "learning_rate": 0.01, "lora": {"r": 4, "alpha": 8},
    })
    trainer = Trainer(recipe, progress=False)
    try:
        final = trainer.fit()
    finally:
        trainer.close()
    run = tmp_path / "rooms"
    assert [s.task_set for s in final] == ["public:val"] and final[0].n == 3
    for adapter in ("final", "best", WARM_START_DIR):
        assert (run / adapter / "adapter_config.json").exists()
    assert json.loads((run / "best" / "rltrain_best.json").read_text())["step"] == 2
    assert (run / "eval" / "baseline.json").exists() and (run / "eval" / "final.json").exists()
    records = read_metrics(run / "metrics.jsonl")
    events = [r["event"] for r in records]
    assert events.count("sft") >= 2 and events[-1] == "done"
    [collected] = [r for r in records if r["event"] == "demonstrations"]
    assert collected["warm_start/teacher/kept"] == 3
    [done] = [r for r in records if r["event"] == "sft_done"]
    assert (done["sft/steps"], done["sft/rows"]) == (2, 3) and done["sft/longest_row"] > 0
    losses = [r["loss"] for r in records if r["event"] == "sft" and "loss" in r]
    assert len(losses) == 2 and all(loss > 0 for loss in losses)


def test_warm_start_then_grpo_continues_the_same_adapter(tmp_path: Path, tiny_model_dir: Path) -> None:
    grpo = {"name": "grpo", "max_steps": 1, "tasks_per_step": 2, "num_generations": 4, "learning_rate": 0.05,
            "eval_steps": 5, "save_steps": 1, "max_completion_length": 8, "resample_zero_std": 3,
            "lora": {"r": 4, "alpha": 8}}
    warm = {"sources": ["self"], "samples_per_task": 4, "max_steps": 1, "batch_size": 4, "learning_rate": 0.05}
    trainer = Trainer(even_recipe(tmp_path, tiny_model_dir, algorithm=grpo, warm_start=warm), progress=False)
    try:
        trainer.fit()
    finally:
        trainer.close()
    run = tmp_path / "even"
    warm_weights = lora_weights(run / WARM_START_DIR)
    step_weights = lora_weights(run / "checkpoints" / "checkpoint-1")
    assert warm_weights.keys() == step_weights.keys()
    assert any(v.abs().sum() > 0 for k, v in warm_weights.items() if "lora_B" in k)
    # one Adam step moves each weight by at most ~lr: GRPO started from the warm-started adapter, and trained it
    moved = max((step_weights[k] - warm_weights[k]).abs().max().item() for k in warm_weights)
    assert 0 < moved <= 0.05 * 1.01
    assert (run / "eval" / "baseline.json").exists() and (run / "eval" / "warm_start.json").exists()
    store = SqliteStore(run / "store.sqlite")
    try:
        assert len(store.list_rollouts(mode="warm_start")) == 16 and len(store.list_rollouts(mode="train")) >= 8
    finally:
        store.close()

    # resume with a longer budget: the warm start is loaded, not collected and trained again
    resumed = Trainer(even_recipe(tmp_path, tiny_model_dir, algorithm={**grpo, "max_steps": 2}, warm_start=warm),
                      progress=False)
    try:
        resumed.fit(resume=True)
    finally:
        resumed.close()
    assert (run / "checkpoints" / "checkpoint-2").exists()
    assert lora_weights(run / WARM_START_DIR).keys() == warm_weights.keys()
    records = read_metrics(run / "metrics.jsonl")
    assert [r["event"] for r in records].count("demonstrations") == 1
    assert [r["step"] for r in records if r["event"] == "rollouts"] == [1, 2]


def test_recipe_sections_for_the_warm_start() -> None:
    recipe = parse_recipe({"algorithm": {"name": "sft", "sources": ["teacher", "self"]}})
    assert recipe.algorithm is not None and recipe.algorithm.name == "sft"
    assert parse_recipe({"warm_start": {}}).warm_start == WarmStartConfig()
    with pytest.raises(RecipeError, match=r"algorithm\.samples_per_tsk: unknown key \(did you mean 'samples_per"):
        parse_recipe({"algorithm": {"name": "sft", "samples_per_tsk": 2}})
    with pytest.raises(RecipeError, match="expected tags: 'grpo', 'sft'"):
        parse_recipe({"algorithm": {"name": "dpo"}})
    with pytest.raises(RecipeError, match="remove warm_start"):
        parse_recipe({"algorithm": {"name": "sft"}, "warm_start": {}})


@pytest.mark.parametrize("progress", [True, False])
def test_training_progress_shows_a_bar_and_prints_no_log_dicts(tmp_path: Path, tiny_model_dir: Path,
                                                               progress: bool) -> None:
    from transformers import PrinterCallback, ProgressCallback, Trainer, TrainingArguments

    from rltrain.algorithms.progress import StepProgress, quiet_progress

    model, _ = load_model_and_tokenizer(str(tiny_model_dir))
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[],
                                                          disable_tqdm=not progress))
    quiet_progress(trainer)
    kinds = [type(cb) for cb in trainer.callback_handler.callbacks]
    assert PrinterCallback not in kinds and ProgressCallback not in kinds
    assert (StepProgress in kinds) is progress


def demonstration_rows(count: int) -> list[Trajectory]:
    """Rows as the gateway records tool-mode demonstrations: one shared system prompt, a request of its own (1 to 5
    tokens), then assistant turns with an environment turn (a tool result, env_mask 0) between them."""
    generator = torch.Generator().manual_seed(5)

    def tokens(n: int) -> list[int]:
        return torch.randint(5, 300, (n,), generator=generator).tolist()

    system = tokens(24)
    rows = []
    for row in range(count):
        request, call, result, answer = (tokens(int(torch.randint(low, high, (), generator=generator)))
                                         for low, high in ((1, 6), (3, 7), (4, 9), (1, 4)))
        completion = call + result + answer
        rows.append(Trajectory(
            rollout_id=f"r{row}", prompt_ids=system + request, completion_ids=completion,
            logprobs=[0.0] * len(completion), env_mask=[1] * len(call) + [0] * len(result) + [1] * len(answer),
            reward=1.0, group_id=f"r{row}", policy_version=0,
        ))
    return rows


def sft_run(model_dir: Path, rows: list[Trajectory], out: Path, *, share: bool) -> tuple[list[dict], dict]:
    model, tokenizer = load_model_and_tokenizer(str(model_dir))
    config = WarmStartConfig(max_steps=3, batch_size=4, learning_rate=0.01, share_prefix_forward=share)
    trainer, _ = build_sft_trainer(model, tokenizer, rows, config, LoraConfig(r=4, alpha=8), out, seed=3,
                                   progress=False)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    weights = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    return logs, weights


def test_the_shared_prefix_runs_once_and_trains_as_whole_rows(tmp_path: Path, tiny_model_dir: Path) -> None:
    rows = demonstration_rows(8)
    whole_logs, whole = sft_run(tiny_model_dir, rows, tmp_path / "whole", share=False)
    shared_logs, shared = sft_run(tiny_model_dir, rows, tmp_path / "shared", share=True)
    assert [round(e["loss"], 4) for e in shared_logs] == [round(e["loss"], 4) for e in whole_logs]
    for key in ("mean_token_accuracy", "num_tokens"):
        assert [e[key] for e in shared_logs] == pytest.approx([e[key] for e in whole_logs], abs=1e-5), key
    assert all(e["shared_prefix/tokens"] == 24 for e in shared_logs), "the system prompt runs once a batch"
    assert "shared_prefix/tokens" not in whole_logs[0]
    assert whole.keys() == shared.keys() and len(whole) > 0
    for name, weight in whole.items():
        torch.testing.assert_close(shared[name], weight, rtol=1e-4, atol=1e-5)

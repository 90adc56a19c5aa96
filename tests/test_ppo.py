"""PPO on a tiny model: the clipped value loss by hand, the critic (shared trunk or separate) learning on a fixed
batch, and whole runs through TRL (steps, critic in checkpoints, resume, warm start).

The runs use the even-length environment of the GRPO tests (``tests/even_length_env.py``), whose reward depends
on what the model sampled, so returns vary and the critic has something to learn.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from even_length_env import EvenLengthEnv
from peft import get_peft_model
from safetensors.torch import load_file
from test_grpo import fit, grpo_recipe, lora_weights

from rltrain import envs
from rltrain.algorithms.critic import (
    CRITIC_FILE,
    Critic,
    CriticCheckpointError,
    build_critic,
    clipped_value_loss,
)
from rltrain.algorithms.grpo import StepSamples, grpo_config, train_with_rollouts
from rltrain.algorithms.ppo import AgentPPOTrainer, PPODriver
from rltrain.algorithms.sft import WARM_START_DIR
from rltrain.metrics import read_metrics
from rltrain.models import load_model_and_tokenizer
from rltrain.recipes import GRPOSection, LoraConfig, ModelConfig, PPOSection, load_recipe, parse_recipe
from rltrain.trainer import Trainer
from rltrain.types import Resources, Task, Trajectory

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


@pytest.fixture(autouse=True)
def parity_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registered for these tests only, so the registry other tests see is untouched."""
    monkeypatch.setitem(envs._REGISTRY, "parity", functools.partial(EvenLengthEnv, n_tasks=6))


def ppo_recipe(tmp_path: Path, model_dir: Path, max_steps: int, **ppo: object):
    """The GRPO tests' recipe with a PPO algorithm section (same data, sampling, batch and LoRA)."""
    recipe = grpo_recipe(tmp_path, model_dir, max_steps).model_dump(mode="json")
    shared = {k: v for k, v in recipe["algorithm"].items() if k not in ("name", "scale_rewards", "share_prompt_forward")}
    recipe["name"] = "ppo-tiny"
    recipe["algorithm"] = {**shared, "name": "ppo", **ppo}
    return parse_recipe(recipe)


# -- the clipped value loss ------------------------------------------------------------------------------------
def test_value_loss_clips_how_far_a_value_may_move_and_stops_its_gradient() -> None:
    values = torch.tensor([[1.0, 0.5, 3.0, 100.0]], requires_grad=True)
    old = torch.tensor([[0.0, 0.4, 0.0, 0.0]])
    returns = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, clipfrac = clipped_value_loss(values, old, returns, mask, cliprange_value=0.2)
    # t0: V moved 1.0 > 0.2 -> V_clip 0.2, errors 0 (unclipped) vs 0.64 (clipped): the clip binds, 0.64
    # t1: moved 0.1, within the range: both errors 0.25
    # t2: V_clip 0.2 -> errors 9 vs 0.04: the larger, unclipped one counts, the clip does not bind
    # t3: masked out
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.25 + 9.0) / 3)
    assert clipfrac.item() == pytest.approx(1 / 3)
    loss.backward()
    # a binding clip leaves no gradient; t1: (V - R) / 3; t2: V / 3; masked: none
    assert values.grad[0].tolist() == pytest.approx([0.0, 0.5 / 3, 1.0, 0.0])


def test_value_loss_without_movement_is_half_the_masked_squared_error() -> None:
    values = torch.tensor([[0.5, 2.0], [1.0, 0.0]])
    returns = torch.tensor([[1.5, 0.0], [0.0, 0.0]])
    loss, clipfrac = clipped_value_loss(values, values, returns, torch.tensor([[1, 0], [1, 0]]), 0.2)
    assert loss.item() == pytest.approx(0.5 * (1.0 + 1.0) / 2)
    assert clipfrac.item() == 0.0


# -- the critic --------------------------------------------------------------------------------------------------
def tiny_policy(model_dir: Path):
    model, tokenizer = load_model_and_tokenizer(str(model_dir))
    model.train()
    return get_peft_model(model, LoraConfig(r=4, alpha=8).to_peft()), tokenizer


def critic_section(model_dir: Path, kind: str) -> PPOSection:
    return PPOSection(lora=LoraConfig(r=4, alpha=8),
                      critic={"model": str(model_dir) if kind == "separate" else None})


def fixed_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Four sequences of 10 tokens (the first two left-padded) whose last 4 are the completion; returns to fit."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 2000, (4, 10), generator=generator)
    attention = torch.ones_like(ids)
    attention[:2, :2] = 0
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]])
    returns = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.3, 0.3], [0.5, 0.6, 0.7, 0.8], [1.0, 0.0, 0.0, 0.0]])
    return ids, attention, mask, returns


@pytest.mark.parametrize("kind", ["shared", "separate"])
def test_critic_value_loss_falls_on_a_fixed_batch(tiny_model_dir: Path, kind: str) -> None:
    torch.manual_seed(0)
    policy, tokenizer = tiny_policy(tiny_model_dir)
    critic = build_critic(policy, tokenizer, critic_section(tiny_model_dir, kind), ModelConfig())
    assert critic.kind == kind
    params = {id(p): p for p in [*critic.trainable().values(), *(p for p in policy.parameters() if p.requires_grad)]}
    optimizer = torch.optim.AdamW(params.values(), lr=1e-2, weight_decay=0.0)
    ids, attention, mask, returns = fixed_batch()
    losses = []
    for _ in range(40):
        with critic.alongside_policy(ids, attention, 4) as values_of:
            policy(input_ids=ids, attention_mask=attention)  # the policy's pass; the shared critic reads it
            values = values_of()
        loss, _ = clipped_value_loss(values, values.detach(), returns, mask, cliprange_value=0.2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(0.5 * (returns**2 * mask).sum().item() / mask.sum().item())  # head starts at 0
    assert losses[-1] < 0.1 * losses[0]


def test_shared_critic_reads_the_policys_own_pass_and_keeps_out_of_its_parameters(tiny_model_dir: Path) -> None:
    policy, tokenizer = tiny_policy(tiny_model_dir)
    critic = build_critic(policy, tokenizer, critic_section(tiny_model_dir, "shared"), ModelConfig())
    assert set(critic.trainable()) == {"head.score.weight", "head.score.bias"}
    with torch.no_grad():
        critic.head.score.weight.normal_()
    ids, attention, _, _ = fixed_batch()
    with torch.no_grad():
        own_pass = critic.values(ids, attention, 4)
        with critic.alongside_policy(ids, attention, 4) as values_of:
            policy(input_ids=ids, attention_mask=attention)
            hooked = values_of()
    assert own_pass.shape == (4, 4) and own_pass.abs().sum() > 0
    torch.testing.assert_close(hooked, own_pass)  # sampling-time values == loss-time values for equal weights
    policy(input_ids=ids, attention_mask=attention)  # the hook is gone after the loss
    with critic.alongside_policy(ids, attention, 4) as values_of, pytest.raises(RuntimeError, match="did not run"):
        values_of()


def test_critic_checkpoint_round_trip_and_mismatch(tmp_path: Path, tiny_model_dir: Path) -> None:
    policy, tokenizer = tiny_policy(tiny_model_dir)
    critic = Critic(policy, owns_trunk=False)
    with torch.no_grad():
        critic.head.score.weight.normal_()
    critic.save(tmp_path)
    fresh = Critic(policy, owns_trunk=False)
    fresh.load(tmp_path)
    torch.testing.assert_close(fresh.head.score.weight, critic.head.score.weight)
    separate = build_critic(policy, tokenizer, critic_section(tiny_model_dir, "separate"), ModelConfig())
    with pytest.raises(CriticCheckpointError, match="holds a shared critic.*recipe's critic is separate"):
        separate.load(tmp_path)
    with pytest.raises(CriticCheckpointError, match="not found"):
        fresh.load(tmp_path / "elsewhere")


# -- whole runs ------------------------------------------------------------------------------------------------
def train_records(run: Path) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if r.get("event") == "train" and "loss" in r]


def test_ppo_steps_checkpoint_the_critic_and_resume(tmp_path: Path, tiny_model_dir: Path) -> None:
    trainer = Trainer(ppo_recipe(tmp_path, tiny_model_dir, max_steps=2), progress=False)
    try:
        trainer.fit()
    finally:
        trainer.close()
    run = tmp_path / "ppo-tiny"
    ckpt1, ckpt2 = run / "checkpoints" / "checkpoint-1", run / "checkpoints" / "checkpoint-2"
    w1, w2 = lora_weights(ckpt1), lora_weights(ckpt2)
    assert any(not torch.equal(w1[k], w2[k]) for k in w1), "the optimiser step must change the LoRA weights"
    c1, c2 = load_file(str(ckpt1 / CRITIC_FILE)), load_file(str(ckpt2 / CRITIC_FILE))
    assert set(c1) == {"head.score.weight", "head.score.bias"}
    assert not torch.equal(c1["head.score.weight"], c2["head.score.weight"]), "the critic must train too"

    logs = train_records(run)
    assert len(logs) == 2
    for key in ("train/value_loss", "train/value_clipfrac", "train/explained_variance", "train/advantage_mean",
                "train/advantage_std", "train/value_mean", "train/return_mean", "train/critic_grad_norm",
                "clip_ratio/region_mean"):
        assert all(key in log for log in logs), key
    assert logs[0]["train/value_mean"] == 0.0, "the value head starts at zero"
    assert logs[1]["train/value_mean"] != 0.0
    assert all(log["train/value_loss"] > 0 for log in logs)

    resumed = Trainer(ppo_recipe(tmp_path, tiny_model_dir, max_steps=3), progress=False)
    try:
        resumed.fit(resume=True)
    finally:
        resumed.close()
    state = json.loads((run / "checkpoints" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    logs = train_records(run)
    assert [log["step"] for log in logs] == [1, 2, 3], "resume must not train finished steps again"
    assert logs[2]["train/value_mean"] != 0.0, "the critic is restored from checkpoint-2, not started afresh"
    assert (run / "checkpoints" / "checkpoint-3" / CRITIC_FILE).exists()


def test_warm_start_then_ppo_with_a_separate_critic_and_per_turn_rewards(tmp_path: Path,
                                                                         tiny_model_dir: Path) -> None:
    recipe = ppo_recipe(tmp_path, tiny_model_dir, max_steps=1, reward_placement="per_turn",
                        critic={"model": str(tiny_model_dir), "learning_rate": 0.01})
    recipe.warm_start = {"sources": ["self"], "samples_per_task": 2, "max_steps": 1, "batch_size": 4,
                         "learning_rate": 0.05}
    trainer = Trainer(recipe, progress=False)
    try:
        trainer.fit()
    finally:
        trainer.close()
    run = tmp_path / "ppo-tiny"
    warm, step = lora_weights(run / WARM_START_DIR), lora_weights(run / "checkpoints" / "checkpoint-1")
    assert warm.keys() == step.keys()
    moved = max((step[k] - warm[k]).abs().max().item() for k in warm)
    assert 0 < moved <= 0.05 * 1.01, "PPO continues the warm-started adapter with one Adam step"
    critic = load_file(str(run / "checkpoints" / "checkpoint-1" / CRITIC_FILE))
    assert "head.score.weight" in critic and any("lora_A" in k for k in critic)
    assert (run / "eval" / "warm_start.json").exists()
    assert "train/value_loss" in train_records(run)[0]


class FixedBatchDriver(PPODriver):
    """Hands TRL the same eight rows every step instead of running the agents: a fixed batch through the whole
    PPO path (TRL's batch, critic values, GAE, the loss on TRL's own forward pass, the critic's optimiser group).
    Rows mix policy and tool tokens, and half of them are rewarded."""

    def sample(self, groups: list[tuple[Task, int]], resources: Resources, version: int) -> StepSamples:
        rows: list[Trajectory | None] = []
        for k in range(sum(size for _, size in groups)):
            completion = [300 + k, 301 + k, 40, 41, 302 + k][: 2 + 3 * (k % 2)]  # odd rows: a tool result + a turn
            rows.append(Trajectory(
                rollout_id=f"fixed-{k}", prompt_ids=[1, 20 + k, 21, 22], completion_ids=completion,
                logprobs=[0.0] * len(completion), env_mask=[1, 1, 0, 0, 1][: len(completion)],
                reward=float(k % 4 < 2), group_id=f"g{k // 4}", policy_version=version,
            ))
        samples = StepSamples(rollouts=[], rows=rows, metrics={"train/reward_mean": 0.5},
                              spans={row.rollout_id: [] for row in rows if row})
        self.place_rewards(samples)
        return samples


def test_value_loss_falls_on_a_fixed_batch_through_the_trainer(tmp_path: Path, tiny_model_dir: Path) -> None:
    # lam = gamma = 1: returns are the rewards-to-go, fixed targets; the policy barely moves (lr 1e-4). Each step
    # logs the loss of its batch before its update.
    recipe = ppo_recipe(tmp_path, tiny_model_dir, max_steps=10, learning_rate=1e-4, lam=1.0, vf_coef=1.0,
                        eval_steps=100, save_steps=100, critic={"learning_rate": 0.005})
    rl = Trainer(recipe, progress=False)
    try:
        assert isinstance(recipe.algorithm, PPOSection)
        factory = functools.partial(AgentPPOTrainer, section=recipe.algorithm, model_config=recipe.model)
        train_with_rollouts(rl.run, recipe.algorithm, factory, FixedBatchDriver, grpo_config(rl.run, recipe.algorithm))
    finally:
        rl.close()
    logs = train_records(tmp_path / "ppo-tiny")
    losses = [log["train/value_loss"] for log in logs]
    assert len(losses) == 10
    assert losses[0] == pytest.approx(0.5 * 0.5)  # V = 0, half the policy tokens' returns are 1
    # below 0.125, what the best constant (0.5 everywhere) would score: the critic tells the rows apart
    assert losses[-1] < 0.5 * losses[0]
    assert logs[0]["train/explained_variance"] == 0.0 and logs[-1]["train/explained_variance"] > 0.3


# -- the recipe --------------------------------------------------------------------------------------------------
def test_cpu_recipe_mirrors_the_grpo_recipe() -> None:
    ppo = load_recipe(RECIPES / "room_selection_ppo_cpu.yaml")
    grpo = load_recipe(RECIPES / "room_selection_grpo_cpu.yaml")
    assert isinstance(ppo.algorithm, PPOSection) and isinstance(grpo.algorithm, GRPOSection)
    for section in ("model", "env", "data", "runner", "sampling", "warm_start", "prompts", "seed"):
        assert getattr(ppo, section) == getattr(grpo, section), section
    shared = set(ppo.algorithm.model_fields) & set(grpo.algorithm.model_fields) - {"name"}
    assert {f: getattr(ppo.algorithm, f) for f in shared} == {f: getattr(grpo.algorithm, f) for f in shared}


def test_ppo_in_micro_batches_trains_policy_and_critic_once_per_step(tmp_path: Path, tiny_model_dir: Path) -> None:
    """8 rows a step in micro-batches of 4: the critic steps with the policy, once per step, on all 8 rows."""
    fit(ppo_recipe(tmp_path, tiny_model_dir, max_steps=2, micro_batch_size=4))
    run = tmp_path / "ppo-tiny"
    logs = train_records(run)
    assert [log["step"] for log in logs] == [1, 2]
    assert all(log["train/value_loss"] > 0 for log in logs)
    c1 = load_file(str(run / "checkpoints" / "checkpoint-1" / CRITIC_FILE))
    c2 = load_file(str(run / "checkpoints" / "checkpoint-2" / CRITIC_FILE))
    assert not torch.equal(c1["head.score.weight"], c2["head.score.weight"])
    rollouts = [r for r in read_metrics(run / "metrics.jsonl") if r.get("event") == "rollouts"]
    assert [(r["step"], r["rollouts/succeeded"]) for r in rollouts] == [(1, 8), (2, 8)]

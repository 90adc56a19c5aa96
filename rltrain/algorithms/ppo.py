"""PPO for agents, on the GRPO machinery: same rollouts, same adapter rows, same TRL clipped policy loss.

TRL 1.16 ships no PPO trainer, and needs none here: its ``GRPOTrainer`` loss already takes advantages of shape
``(B, T)`` (it unsqueezes only 1-D ones), so PPO is GRPO with two methods overridden:

* ``_generate_and_score_completions``: after TRL built the batch (rows from :class:`PPODriver`, which also places
  each row's reward on its tokens), the critic values every completion token (no gradient), and GAE over the
  policy tokens (:func:`~rltrain.adapters.advantages.ppo_advantages`: tool/observation tokens carry no advantage
  and do not break the recursion; whitened over the batch) replaces TRL's group advantages; the sampling-time
  values and the returns travel with the batch (TRL shuffles and splits every ``(B, ...)`` tensor in it).
* ``_compute_loss``: TRL's policy loss, plus ``vf_coef`` times the clipped value loss. The shared critic reads the
  hidden state of TRL's own forward pass, so the value costs no second pass through the model. That is why PPO
  keeps TRL's pass over whole rows, where GRPO runs each distinct prompt once (``share_prompt_forward``).

The critic's weights join the optimiser as a parameter group of their own (``critic.learning_rate``), are
clipped to ``max_grad_norm`` apart from the policy's, saved as ``critic.safetensors`` in every checkpoint and
restored on resume. Metrics (``metrics.jsonl``, event ``train``): ``train/value_loss``, ``train/value_clipfrac``,
``train/explained_variance``, ``train/advantage_mean`` / ``_std`` (before whitening), ``train/value_mean``,
``train/return_mean``, ``train/critic_grad_norm``, and TRL's ``clip_ratio/region_mean``: the policy's clip fraction.

Several training processes (``accelerate launch``): the main process samples and places the token rewards of
the whole step, which travel with the rows it broadcasts; GAE and the whitening run over every rank's rows
(gathered), so each rank's advantages are those a one-process run computes for the same rows; the value loss is
weighted by each rank's share of the step's tokens, and the critic's gradients (accelerate does not wrap the
critic) are averaged across ranks before clipping.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl.models.utils import disable_gradient_checkpointing

from rltrain import distributed
from rltrain.adapters.advantages import ppo_advantages, token_rewards
from rltrain.algorithms.critic import build_critic, clipped_value_loss
from rltrain.algorithms.grpo import (
    AgentGRPOTrainer,
    RolloutDriver,
    StepSamples,
    grpo_config,
    train_with_rollouts,
)
from rltrain.metrics import EvalSummary
from rltrain.recipes import ModelConfig, PPOSection
from rltrain.types import Resources, Task

if TYPE_CHECKING:
    from rltrain.run_context import RunContext

logger = logging.getLogger(__name__)


#: the column that carries the token rewards from the main process to every rank (taken off before TRL sees it)
TOKEN_REWARDS = "token_rewards"


class PPODriver(RolloutDriver):
    """The rollout driver of GRPO that also places each row's reward on its tokens (``reward_placement``), for
    the trainer to take with the batch it belongs to."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(self.section, PPOSection):
            raise TypeError(f"PPODriver needs a PPOSection, got {type(self.section).__name__}")
        self.ppo: PPOSection = self.section
        self._token_rewards: list[list[float]] | None = None

    no_signal_reason = "every rollout of the step earned the same reward"

    def no_signal(self, rewards: list[float], every_group_flat: bool) -> bool:
        """PPO's baseline is the critic, not the group: equal rewards within groups still teach it, unless the
        whole step's rewards are equal."""
        return len(set(rewards)) <= 1

    def sample(self, groups: list[tuple[Task, int]], resources: Resources, version: int) -> StepSamples:
        samples = super().sample(groups, resources, version)
        self.place_rewards(samples)
        return samples

    def columns(self, prompts: list[str], version: int) -> dict[str, list[Any]]:
        """TRL's columns, plus the token rewards, so that they reach every rank with the rows they belong to."""
        out = super().columns(prompts, version)
        out[TOKEN_REWARDS] = self.take_token_rewards()
        return out

    def __call__(self, prompts: list[Any], trainer: Any) -> dict[str, list[Any]]:
        out = super().__call__(prompts, trainer)
        self._token_rewards = out.pop(TOKEN_REWARDS)
        return out

    def place_rewards(self, samples: StepSamples) -> None:
        """Put each row's reward(s) on its tokens (``reward_placement``), to be taken with the batch."""
        per_turn = self.ppo.reward_placement == "per_turn"
        self._token_rewards = [
            [] if row is None else token_rewards(row, samples.spans[row.rollout_id], per_turn=per_turn)
            for row in samples.rows
        ]

    def take_token_rewards(self) -> list[list[float]]:
        """The token rewards of the rows last handed to TRL, in their order (``[]`` for a rollout without a row);
        each batch's are taken once."""
        if self._token_rewards is None:
            raise RuntimeError("no token rewards to take: TRL asked for advantages without sampling a batch first")
        rewards, self._token_rewards = self._token_rewards, None
        return rewards


def _sequences(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Prompt + completion ids and attention mask as TRL feeds them to the model, and the completion length."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    return ids, attention, batch["completion_ids"].size(1)


def _loss_mask(batch: dict[str, Any]) -> torch.Tensor:
    """TRL's loss mask: real completion tokens that the policy sampled (``env_mask`` arrives as ``tool_mask``)."""
    mask = batch["completion_mask"]
    return mask * batch["tool_mask"] if "tool_mask" in batch else mask


class AgentPPOTrainer(AgentGRPOTrainer):
    """``trl.GRPOTrainer`` turned into PPO: per-token GAE advantages from a critic, and a clipped value loss."""

    driver: PPODriver

    def __init__(self, *, driver: PPODriver, section: PPOSection, model_config: ModelConfig, **kwargs: Any) -> None:
        super().__init__(driver=driver, **kwargs)
        self.ppo = section
        self.critic = build_critic(self.model, self.processing_class, section, model_config)
        logger.info("PPO critic: %s, %d trainable tensors", self.critic.kind, len(self.critic.trainable()))

    # -- optimiser: the critic's weights are a parameter group of their own -------------------------------
    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        fresh = self.optimizer is None
        optimizer = super().create_optimizer(model)
        if fresh:
            optimizer.add_param_group({
                "params": list(self.critic.trainable().values()),
                "lr": self.ppo.critic.learning_rate or self.args.learning_rate,
                "weight_decay": 0.0,
            })
        return optimizer

    def _clip_grad_norm(self, model: Any) -> Any:
        norm = super()._clip_grad_norm(model)
        distributed.average_gradients(self.critic.trainable().values())
        critic_norm = torch.nn.utils.clip_grad_norm_(list(self.critic.trainable().values()), self.args.max_grad_norm)
        self._metrics["train"]["train/critic_grad_norm"].append(float(critic_norm))
        return norm

    # -- advantages ----------------------------------------------------------------------------------------
    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super()._generate_and_score_completions(inputs)
        rewards = self.driver.take_token_rewards()
        mask = _loss_mask(batch)
        rows, length = mask.shape
        if len(rewards) != rows:
            raise RuntimeError(f"{len(rewards)} rows of token rewards for a batch of {rows} completions")
        masks = mask.int().tolist()
        # A row TRL left out of the loss (a filler, or a truncated row under mask_truncated_completions) trains
        # neither the policy nor the critic: it gets no reward.
        padded = [r + [0.0] * (length - len(r)) if any(m) else [0.0] * length
                  for r, m in zip(rewards, masks, strict=True)]
        ids, attention, _ = _sequences(batch)
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            values = self.critic.values(ids, attention, length) * mask
        # GAE and the whitening over the whole step: every rank's rows (ragged: each rank pads to its own length)
        step_rows, start = distributed.gather_lists(list(zip(padded, values.tolist(), masks, strict=True)))
        estimate = ppo_advantages([r for r, _, _ in step_rows], [v for _, v, _ in step_rows],
                                  [m for _, _, m in step_rows], self.ppo.gamma, self.ppo.lam,
                                  whiten_advantages=self.ppo.whiten_advantages)
        mine = slice(start, start + rows)
        batch["advantages"] = torch.tensor(estimate.advantages[mine], dtype=torch.float32, device=mask.device)
        batch["returns"] = torch.tensor(estimate.returns[mine], dtype=torch.float32, device=mask.device)
        batch["old_values"] = values
        mode = "train" if self.model.training else "eval"
        for key, value in estimate.metrics.items():
            self._metrics[mode][key].append(value)
        return batch

    # -- loss ----------------------------------------------------------------------------------------------
    def _compute_loss(self, model: Any, inputs: dict[str, Any]) -> torch.Tensor:
        ids, attention, length = _sequences(inputs)
        with self.critic.alongside_policy(ids, attention, length) as values_of:
            policy_loss = super()._compute_loss(model, inputs)
            values = values_of()
        mask = _loss_mask(inputs)
        value_loss, clipfrac = clipped_value_loss(
            values, inputs["old_values"], inputs["returns"], mask, self.ppo.cliprange_value
        )
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["train/value_loss"].append(value_loss.item())
        self._metrics[mode]["train/value_clipfrac"].append(clipfrac.item())
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        # this rank's share of the mean over every rank's tokens, once the gradients are averaged across ranks
        share = distributed.rank_weight(float(mask.sum())) if mode == "train" else 1.0
        return policy_loss + self.ppo.vf_coef * share * value_loss / accumulation

    # -- checkpoints: the critic's weights next to the adapter -----------------------------------------------
    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        folder.mkdir(parents=True, exist_ok=True)
        # Before TRL's save, which writes trainer_state.json last: a checkpoint that has it has the critic too.
        if self.args.should_save:
            self.critic.save(folder)
        super()._save_checkpoint(model, trial)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self.critic.load(Path(resume_from_checkpoint))


def train_ppo(rl: RunContext, resume: bool = False, stop_at: float | None = None) -> list[EvalSummary]:
    """The whole PPO run: like GRPO's (warm start, validation, checkpoints, resume), with the PPO trainer."""
    section = rl.recipe.algorithm
    assert isinstance(section, PPOSection)
    factory = functools.partial(AgentPPOTrainer, section=section, model_config=rl.recipe.model)
    return train_with_rollouts(rl, section, factory, PPODriver, grpo_config(rl, section), resume=resume,
                               stop_at=stop_at)

"""GRPO: TRL's GRPOTrainer, fed by the user's agents through ``rollout_func``.

TRL does the optimisation (loss, clipping, KL, LoRA through PEFT); rltrain supplies the samples. The training
dataset holds task ids only. TRL's sampler repeats each id ``num_generations`` times and hands the batch to
:class:`RolloutDriver`, which runs that many rollouts of the agent per task through the gateway, turns their
spans into token rows with the trajectory adapter, and returns exactly one row per prompt it received, in order,
so TRL's group statistics line up with the task groups.

With a ``warm_start:`` block the adapter is first fine-tuned on demonstrations (:mod:`.sft`) and GRPO continues
training that same adapter.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from accelerate.utils import DistributedType
from transformers import TrainerCallback, TrainerControl, TrainerState
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import split_tensor_dict

from rltrain import distributed
from rltrain.adapters.advantages import answer_distribution, collapse_warning, group_advantages
from rltrain.adapters.trajectories import TrajectoryAdapter
from rltrain.agent import Agent
from rltrain.algorithms.progress import quiet_progress
from rltrain.algorithms.run_state import (
    accuracies,
    best_summaries,
    keep_if_best,
    resume_checkpoint,
    train_or_restore,
    validated,
)
from rltrain.algorithms.sft import warm_start
from rltrain.algorithms.shared_prompt import shared_prompt_logps
from rltrain.algorithms.weight_sync import attach_weight_sync, importance_sampling_args
from rltrain.envs.base import Environment
from rltrain.metrics import EvalSummary, MetricsWriter, peak_rss_mb, plot_run
from rltrain.recipes import GRPOSection, RLSection, RunnerConfig
from rltrain.runner import Runner, RunStats
from rltrain.serving import ServingStack
from rltrain.store.base import Store
from rltrain.types import Resources, Rollout, Span, Task, Trajectory

if TYPE_CHECKING:
    from rltrain.run_context import RunContext

logger = logging.getLogger(__name__)


class CompletionTooLongError(ValueError):
    """A step's row is longer than ``algorithm.max_completion_length``; the message names the length needed."""


@dataclass
class StepSamples:
    """What one generation step produced, before it is handed to TRL (``spans``: each rollout's final-attempt
    spans, by rollout id)."""

    rollouts: list[Rollout]
    rows: list[Trajectory | None]
    metrics: dict[str, Any] = field(default_factory=dict)
    spans: dict[str, list[Span]] = field(default_factory=dict)


class RolloutDriver:
    """The ``rollout_func`` given to TRL: task ids in, one adapter row per id out.

    ``resources_for(version)`` gives the resources of the policy version about to be sampled (the trainer's
    global step); the engine it names shares the trainer's model object, so sampling uses current weights.
    """

    def __init__(
        self,
        *,
        agent: Agent,
        env: Environment,
        store: Store,
        tasks: list[Task],
        section: RLSection,
        runner_config: RunnerConfig,
        metrics: MetricsWriter,
        progress: bool = True,
    ) -> None:
        self.agent = agent
        self.env = env
        self.store = store
        self.tasks = {t.id: t for t in tasks}
        self.section = section
        self.runner_config = runner_config
        self.metrics = metrics
        self.progress = progress
        self.adapter = TrajectoryAdapter(tag=section.train_tag)
        self.gateway_url = ""
        self.resources_for: Any = None
        self.on_policy_version: Any = None
        self.on_finished: Any = None

    def bind(self, gateway_url: str, resources_for: Any, on_policy_version: Any, on_finished: Any) -> None:
        """Connect to the serving stack (started after TRL built the PEFT model the engine must share)."""
        self.gateway_url = gateway_url
        self.resources_for = resources_for
        self.on_policy_version = on_policy_version
        self.on_finished = on_finished

    # TRL calls this on every process with that process's prompts, each task id repeated num_generations times.
    def __call__(self, prompts: list[Any], trainer: GRPOTrainer) -> dict[str, list[Any]]:
        """The main process samples the whole step (every rank's prompts, gathered in rank order, so groups split
        across ranks stay whole and the serving stack stays one process) and broadcasts the columns; each rank
        keeps the rows of its own prompts. One process: the same, without the collectives."""
        everyone, start = distributed.gather_lists([str(p) for p in prompts])
        columns = self.columns(everyone, int(trainer.state.global_step)) if distributed.is_main() else None
        columns = distributed.broadcast(columns)
        assert columns is not None
        return {key: values[start:start + len(prompts)] for key, values in columns.items()}

    def columns(self, prompts: list[str], version: int) -> dict[str, list[Any]]:
        """Sample ``prompts`` with the policy of ``version`` and return TRL's columns, one entry per prompt (main
        process only: it owns the serving stack and the metrics)."""
        self.on_policy_version(version)
        samples = self.sample(self._groups(prompts), self.resources_for(version), version)
        rows = samples.rows
        filler = self._filler_row(rows)
        out: dict[str, list[Any]] = {"prompt_ids": [], "completion_ids": [], "logprobs": [], "env_mask": [],
                                     "rollout_reward": []}
        for row in rows:
            row = row or filler
            out["prompt_ids"].append(row.prompt_ids)
            out["completion_ids"].append(row.completion_ids)
            out["logprobs"].append(row.logprobs)
            out["env_mask"].append(row.env_mask)
            out["rollout_reward"].append(None if row is filler else row.reward)
        # the line belongs to the optimiser step these samples lead to (version + 1), like TRL's ``train`` line, so
        # that it is kept on resume exactly when that step's checkpoint is complete (see run_state)
        self.metrics.write({"event": "rollouts", **samples.metrics}, step=version + 1)
        return out

    no_signal_reason = "every group has equal rewards"

    def no_signal(self, rewards: list[float], every_group_flat: bool) -> bool:
        """Whether a step's rewards cannot move the policy: for GRPO, when every group's rewards are equal
        (group-relative advantages are all zero)."""
        return every_group_flat

    def _groups(self, prompts: list[Any]) -> list[tuple[Task, int]]:
        """Consecutive equal task ids form one group (that is how TRL's RepeatSampler orders them)."""
        groups: list[tuple[Task, int]] = []
        for prompt in prompts:
            task_id = str(prompt)
            if task_id not in self.tasks:
                raise KeyError(f"rollout_func got prompt {task_id!r}, which is not a training task id")
            if groups and groups[-1][0].id == task_id:
                groups[-1] = (groups[-1][0], groups[-1][1] + 1)
            else:
                groups.append((self.tasks[task_id], 1))
        return groups

    def sample(self, groups: list[tuple[Task, int]], resources: Resources, version: int) -> StepSamples:
        """Run every group, re-running all-equal groups up to ``resample_zero_std`` times; adapt to rows."""
        start = time.perf_counter()
        runner = Runner(self.store, self.agent, self.gateway_url, self.runner_config, progress=self.progress,
                        on_finished=self.on_finished)
        stats = RunStats()
        by_group = asyncio.run(self._run_groups(runner, groups, resources, version, stats))
        resampled = 0
        fresh = self._fresh_tasks(groups, version)
        for attempt in range(self.section.resample_zero_std):
            flat = [i for i, g in enumerate(by_group) if _zero_std(g)]
            if not flat:
                break
            retry = [groups[i] if fresh is None else (next(fresh, groups[i][0]), groups[i][1]) for i in flat]
            again = asyncio.run(self._run_groups(runner, retry, resources, version, stats, f"resample {attempt}"))
            for i, rollouts in zip(flat, again, strict=True):
                if not _zero_std(rollouts):
                    by_group[i] = rollouts
                    resampled += 1
        stats.stop_if_mostly_failed(self.runner_config.max_failed_fraction, f"step {version}")
        rollouts = [r for g in by_group for r in g]
        # Read each rollout's final-attempt spans once: the adapter and the answer diagnostics both need them.
        spans = {r.rollout_id: self.store.get_spans(r.rollout_id, r.attempt_count) for r in rollouts}
        rows, adapter_metrics = self._rows(rollouts, spans)
        rewards = [r.reward if r.reward is not None else 0.0 for r in rollouts]
        groups_ids = [r.group_id or r.task.id for r in rollouts]
        adv = group_advantages(rewards, groups_ids)  # only its group statistics are used, for the metrics
        answers = [self.env.answer_of(spans[r.rollout_id]) for r in rollouts]
        dist = answer_distribution(answers)
        warning = collapse_warning(dist)
        if warning:
            logger.warning("step %d: %s", version, warning)
        if self.no_signal(rewards, adv.no_signal):
            logger.warning(
                "step %d: %s, so this step has no learning signal; consider a warm start, a higher sampling "
                "temperature, more generations or algorithm.resample_zero_std", version, self.no_signal_reason
            )
        metrics: dict[str, Any] = {
            **stats.as_metrics(),
            **adapter_metrics,
            **adv.metrics(),
            "train/reward_mean": sum(rewards) / len(rewards) if rewards else 0.0,
            "train/resampled_groups": resampled,
            "train/answer_distribution": dist,
            "train/collapse_warning": warning,
            "train/rollout_s": time.perf_counter() - start,
            "policy_version": version,
        }
        return StepSamples(rollouts=rollouts, rows=rows, metrics=metrics, spans=spans)

    def _fresh_tasks(self, groups: list[tuple[Task, int]], version: int) -> Iterator[Task] | None:
        """For ``resample_with: new_task``: the training tasks not in this step, in an order fixed by the step
        (a resumed run draws the same ones); None when re-runs repeat their own task."""
        if self.section.resample_with == "same_task":
            return None
        taken = {task.id for task, _ in groups}
        pool = [task for task_id, task in self.tasks.items() if task_id not in taken]
        random.Random(f"resample:{version}").shuffle(pool)
        return iter(pool)

    async def _run_groups(
        self, runner: Runner, groups: list[tuple[Task, int]], resources: Resources, version: int,
        stats: RunStats, label: str = "",
    ) -> list[list[Rollout]]:
        """Run each (task, size) group; rollouts come back grouped in the order asked."""
        by_size: dict[int, list[int]] = {}
        for i, (_, size) in enumerate(groups):
            by_size.setdefault(size, []).append(i)
        out: list[list[Rollout]] = [[] for _ in groups]
        for size, indices in by_size.items():
            result = await runner.run(
                [groups[i][0] for i in indices], resources, mode="train", group_size=size,
                desc=f"step {version} rollouts {label}".strip(),
            )
            for k, i in enumerate(indices):
                out[i] = result.rollouts[k * size:(k + 1) * size]
            stats.add(result.stats)
        return out

    def _rows(
        self, rollouts: list[Rollout], spans: dict[str, list[Span]]
    ) -> tuple[list[Trajectory | None], dict[str, float]]:
        """One row per rollout (TRL trains one sequence per sample): its last row, whole.

        A multi-turn row holds every turn after the first prompt (the model's replies, the tool results and the
        template tokens between them, masked), so its length comes from the data. A row longer than
        ``max_completion_length`` is an error naming the length it needs, never cut: a cut row would train the
        first turns (a tool call) with the reward the whole conversation (its answer) earned."""
        limit = self.section.max_completion_length
        result = self.adapter.adapt_many((r, spans[r.rollout_id]) for r in rollouts)
        last: dict[str, Trajectory] = {}
        for row in result.rows:
            last[row.rollout_id] = row
        untrained = len(result.rows) - len(last)
        rows = [last.get(r.rollout_id) for r in rollouts]
        too_long = [(len(row.completion_ids), sum(row.env_mask), row.rollout_id)
                    for row in rows if row is not None and len(row.completion_ids) > limit]
        if too_long:
            longest, policy_tokens, rollout_id = max(too_long)
            raise CompletionTooLongError(
                f"{len(too_long)} of {len(rows)} rows are longer than algorithm.max_completion_length={limit} "
                f"tokens (the longest: {longest} tokens after the first prompt, {policy_tokens} of them the "
                f"model's and the rest tool results and template tokens, in rollout {rollout_id}); rows are not "
                "cut, because a cut row trains part of a conversation with the reward of the whole: set "
                f"algorithm.max_completion_length to at least {longest}, with room for longer replies"
            )
        metrics = result.metrics()
        metrics["adapter/rows_not_trained"] = float(untrained)
        metrics["train/rollouts_without_row"] = float(sum(row is None for row in rows))
        metrics["train/longest_row"] = float(max((len(r.completion_ids) for r in rows if r is not None), default=0))
        return rows, metrics

    @staticmethod
    def _filler_row(rows: list[Trajectory | None]) -> Trajectory:
        """A placeholder for a rollout that produced no row (failed, no reward, no llm call): every token is
        masked and its reward is None, so TRL leaves it out of the group baseline and the loss."""
        template = next((r for r in rows if r is not None), None)
        prompt = template.prompt_ids[:1] if template is not None else [0]
        token = template.completion_ids[-1:] if template is not None else [0]
        return Trajectory(rollout_id="filler", prompt_ids=prompt, completion_ids=token, logprobs=[0.0],
                          env_mask=[0], reward=0.0, group_id="filler", policy_version=0)


def _zero_std(rollouts: list[Rollout]) -> bool:
    rewards = {r.reward for r in rollouts}
    return len(rewards) <= 1


def rollout_reward(prompts: list[Any], completions: list[Any], rollout_reward: list[float | None],
                   **_: Any) -> list[float | None]:
    """TRL reward function: the reward each rollout's agent returned (None = not scorable, left out)."""
    return list(rollout_reward)


class AgentGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` whose samples come from rltrain's agents (see :class:`RolloutDriver`).

    ``share_prompts``: log-probs are computed with each distinct prompt run once (:mod:`.shared_prompt`); for that
    a step's micro-batches keep the rows of a group together.
    """

    def __init__(self, *, driver: RolloutDriver, share_prompts: bool = False, **kwargs: Any) -> None:
        self.driver = driver
        self.share_prompts = share_prompts
        super().__init__(reward_funcs=[rollout_reward], rollout_func=driver, **kwargs)

    def _prepare_inputs(self, generation_batch: dict[str, Any]) -> dict[str, Any]:
        """TRL's, without its shuffle of the rows across micro-batches: the rows come grouped by task (see
        :meth:`RolloutDriver.__call__`), and a micro-batch that holds whole groups computes each prompt once. The
        shuffle changes nothing else here: every micro-batch of a generation joins one optimiser step."""
        if not self.model.training:
            return super()._prepare_inputs(generation_batch)
        generate_every = self.args.steps_per_generation * self.num_iterations
        if self._step % generate_every == 0 or self._buffered_inputs is None:
            batch = self._generate_and_score_completions(generation_batch)
            self._buffered_inputs = split_tensor_dict(batch, self.args.steps_per_generation)
        return self._buffered_inputs[self._step % self.args.steps_per_generation]

    def _get_per_token_logps_and_entropies(  # type: ignore[override]
        self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int,
        batch_size: int | None = None, compute_entropy: bool = False, compute_aux_loss: bool = False,
        **inputs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """With ``share_prompts``, text-only rows go through :func:`.shared_prompt.shared_prompt_logps`; anything
        else (images, MoE aux loss, prompts that do not group) through TRL's pass over whole rows."""
        if self.share_prompts and not compute_aux_loss and all(v is None for v in inputs.values()):
            shared = shared_prompt_logps(model, input_ids, attention_mask, logits_to_keep, compute_entropy,
                                         self.accelerator.autocast)
            if shared is not None:
                mode = "train" if self.model.training else "eval"
                self._metrics[mode]["shared_prompt/rows_per_pass"].append(shared.rows_per_prompt)
                self._metrics[mode]["shared_prompt/completion_tokens_once"].append(shared.shared_completion_tokens)
                return shared.logps, shared.entropies, None
        return super()._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
            compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **inputs,
        )


class _RunCallback(TrainerCallback):
    """Validation every ``eval_steps`` (best adapter kept), TRL's logs into metrics.jsonl, the plot; in a
    multi-process run the main process validates (the others may have no ``stack``) and every step logs how far
    the replicas of the trainable weights drifted apart (``dist/replica_max_diff``, 0.0 under data parallelism).
    """

    def __init__(self, rl: RunContext, stack: ServingStack | None, section: RLSection, trainer: GRPOTrainer) -> None:
        self.rl = rl
        self.stack = stack
        self.section = section
        self.trainer = trainer
        self.model = trainer.model
        # DeepSpeed and FSDP may shard the weights (each rank holds different slices): compare plain DDP replicas
        self.replicated = distributed.world_size() > 1 and trainer.accelerator.distributed_type in (
            DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)

    def validate(self, step: int, label: str | None = None) -> list[EvalSummary]:
        """Main process: validate, keep ``best/``, plot. Others: the main process's summaries, once it is done."""
        summaries = None
        if distributed.is_main():
            assert self.stack is not None
            summaries = self.rl.evaluate(self.rl.eval_sets(), stack=self.stack, label=label or f"val-step{step}",
                                         step=step)
            keep_if_best(self.rl.run_dir, self.model, summaries, step, self.rl.recipe.data.select)
            plot_run(self.rl.run_dir / "metrics.jsonl", self.rl.run_dir / "plot.png")
        return distributed.broadcast(summaries) or []

    def on_step_end(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.replicated:
            trainable = [p for p in self.model.parameters() if p.requires_grad]
            drift = distributed.replica_divergence(trainable)
            self.rl.metrics.write({"event": "replicas", "dist/replica_max_diff": drift,
                                   "dist/world_size": distributed.world_size()}, step=state.global_step)
        if self.stack is not None:
            self.stack.engine.set_policy_version(state.global_step)
        if state.global_step % self.section.eval_steps == 0 and state.global_step < state.max_steps:
            self.validate(state.global_step)

    def on_log(self, args: Any, state: TrainerState, control: TrainerControl, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        if logs:
            self.rl.metrics.write({"event": "train", **logs}, step=state.global_step)


def rows_per_process(section: RLSection) -> int:
    """Each training process's share of a step's ``tasks_per_step x num_generations`` rows: the step is the same
    global batch whatever the number of processes (TRL's generation batch is per process x processes)."""
    world = distributed.world_size()
    if section.rows_per_step % world:
        raise ValueError(f"algorithm: a step's {section.rows_per_step} rows (tasks_per_step x num_generations) "
                         f"cannot be split evenly over {world} training processes; make them a multiple of {world}")
    return section.rows_per_step // world


def grpo_config(rl: RunContext, section: RLSection, **fields: Any) -> GRPOConfig:
    """TRL's config from the recipe's shared GRPO/PPO fields; ``fields`` adds the algorithm's own."""
    recipe = rl.recipe
    sampling = recipe.sampling.train
    on_cpu = recipe.model.device == "cpu"
    per_process = rows_per_process(section)
    micro = min(section.micro_batch_size or per_process, per_process)
    if per_process % micro:
        raise ValueError(f"algorithm.micro_batch_size={micro} must divide each process's share of the step's "
                         f"rows ({per_process} = {section.rows_per_step} rows over {distributed.world_size()} "
                         "processes)")
    return GRPOConfig(
        output_dir=str(rl.run_dir / "checkpoints"),
        use_cpu=on_cpu,
        bf16=not on_cpu and recipe.model.dtype == "bfloat16",
        fp16=not on_cpu and recipe.model.dtype == "float16",
        seed=recipe.seed,
        max_steps=section.max_steps,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=per_process // micro,
        ddp_timeout=distributed.COLLECTIVE_TIMEOUT_S,
        num_generations=section.num_generations,
        learning_rate=section.learning_rate,
        lr_scheduler_type=section.lr_scheduler_type,
        warmup_steps=section.warmup_steps,
        max_grad_norm=section.max_grad_norm,
        activation_checkpointing=section.gradient_checkpointing,
        loss_type=section.loss_type,
        beta=section.beta,
        epsilon=section.epsilon,
        epsilon_high=section.epsilon_high,
        num_iterations=section.num_iterations,
        mask_truncated_completions=section.mask_truncated_completions,
        max_completion_length=section.max_completion_length,
        temperature=max(sampling.temperature, 1e-5),
        top_p=sampling.top_p,
        save_strategy="steps",
        save_steps=section.save_steps,
        logging_steps=1,
        report_to=[],
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=not rl.progress,
        **importance_sampling_args(section),
        **fields,
    )


def train_grpo(rl: RunContext, resume: bool = False, stop_at: float | None = None) -> list[EvalSummary]:
    """The whole GRPO run (see :func:`train_with_rollouts`)."""
    section = rl.recipe.algorithm
    assert isinstance(section, GRPOSection)
    args = grpo_config(rl, section, scale_rewards=section.scale_rewards)
    factory = functools.partial(AgentGRPOTrainer, share_prompts=section.share_prompt_forward)
    return train_with_rollouts(rl, section, factory, RolloutDriver, args, resume=resume, stop_at=stop_at)


def train_with_rollouts(
    rl: RunContext,
    section: RLSection,
    trainer_factory: Callable[..., AgentGRPOTrainer],
    driver_cls: type[RolloutDriver],
    args: GRPOConfig,
    resume: bool = False,
    stop_at: float | None = None,
) -> list[EvalSummary]:
    """A TRL run fed by the agents (GRPO, or PPO through its trainer and driver): baseline validation (or the
    warm start and its validation), training, final validation.

    ``stop_at`` (the escalation ladder's target): when the warm start alone reaches this accuracy on the first
    validation set, no RL step runs and the warm start's validation is returned.
    """
    from datasets import Dataset

    from rltrain.models import load_policy

    recipe = rl.recipe
    main = distributed.is_main()
    if recipe.warm_start is not None and distributed.world_size() > 1:
        raise ValueError("warm_start: not supported with several training processes yet; run the warm start in one "
                         "process (algorithm: sft) and start RL from its adapter (model.adapter)")
    train_spec = recipe.data.train
    if train_spec is None:
        raise ValueError(f"data.train is not set: {section.name.upper()} needs training tasks")
    train_tasks = rl.load_tasks(train_spec)
    rl.eval_sets()  # a bad task spec fails here, before minutes of model loading (and before resume touches files)
    checkpoint = resume_checkpoint(rl, section.lora, section.max_steps) if resume else None
    model, tokenizer = load_policy(recipe.model.name, recipe.model.adapter, dtype=recipe.model.dtype,
                                   device=recipe.model.device, trainable=True)
    peft_config = section.lora.to_peft() if recipe.model.adapter is None else None  # else training continues it
    warm = None
    if recipe.warm_start is not None:
        warm = warm_start(rl, model, tokenizer, recipe.warm_start, section.lora, resume=resume)
        model, peft_config = warm.model, None  # RL continues this adapter (a checkpoint, on resume, replaces it)
    driver = driver_cls(
        agent=rl.agent(), env=rl.env, store=rl.store, tasks=train_tasks, section=section,
        runner_config=recipe.runner, metrics=rl.metrics, progress=rl.progress,
    )
    trl_trainer = trainer_factory(
        driver=driver,
        model=model,
        processing_class=tokenizer,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": [t.id for t in train_tasks]}),
        peft_config=peft_config,
    )
    prompts = rl.prompts()
    # Only the main process samples (see RolloutDriver.__call__) and validates; the others train on its rows.
    # With vLLM every rank holds a client of the one server (engine.vllm.url): the weight sync is collective.
    vllm = recipe.engine.kind == "vllm"
    serving = ServingStack(recipe, rl.store, model=trl_trainer.model, tokenizer=tokenizer) if main or vllm else None
    with serving or contextlib.nullcontext() as stack:
        if main:
            driver.bind(
                stack.url,
                lambda version: rl.resources(stack.model_name, recipe.sampling.train, version=version,
                                             prompts=prompts),
                stack.engine.set_policy_version,
                stack.release,
            )
        if stack is not None:
            attach_weight_sync(recipe, stack.engine, trl_trainer)  # vLLM: policy-v{step} before validating a step
        callback = _RunCallback(rl, stack, section, trl_trainer)
        trl_trainer.add_callback(callback)
        quiet_progress(trl_trainer)  # logs go to metrics.jsonl, not stdout
        if warm is not None and (warm.fresh or not validated(rl.run_dir, "warm_start")):  # now the warm start's adapter
            after_warm = callback.validate(0, label="warm_start")
            logger.info("after the warm start: %s", accuracies(after_warm))
            if stop_at is not None and after_warm[0].accuracy >= stop_at:
                logger.info("the warm start reached the target %.3f: no RL steps", stop_at)
                return after_warm
        elif warm is None and checkpoint is None and not (resume and validated(rl.run_dir, "baseline")):
            # the fresh adapter is the base model: a candidate for best/
            baseline = callback.validate(0, label="baseline")
            logger.info("baseline: %s", accuracies(baseline))
        started = time.perf_counter()
        train_or_restore(trl_trainer, checkpoint, section.max_steps)
        train_s = time.perf_counter() - started
        if main:
            trl_trainer.model.save_pretrained(rl.run_dir / "final")
        final = callback.validate(section.max_steps)
    if not main:
        return final
    rl.metrics.write({"event": "done", "train_s": train_s, "peak_rss_mb": peak_rss_mb(),
                      "dist/world_size": distributed.world_size()}, step=section.max_steps)
    plot_run(rl.run_dir / "metrics.jsonl", rl.run_dir / "plot.png")
    logger.info("final: %s (training %.0f s)", accuracies(final), train_s)
    return chosen_result(rl, final)


def chosen_result(rl: RunContext, final: list[EvalSummary]) -> list[EvalSummary]:
    """What a run reports: with ``data.select``, the validation of the adapter chosen on it (``best/``, maybe an
    earlier step than the last); without, the last adapter's."""
    select = rl.recipe.data.select
    best = best_summaries(rl.run_dir) if select else None
    if best is None:
        return final
    step, summaries = best
    logger.info("chosen on %s: the adapter of step %d (best/): %s", select, step, accuracies(summaries))
    return summaries

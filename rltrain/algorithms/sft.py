"""Supervised warm start: fine-tune the LoRA adapter on rewarded transcripts with TRL's ``SFTTrainer``.

Demonstrations are rollouts like any other. The environment's teacher agent (once per task) and/or the recipe's
own agent (``samples_per_task`` times per task: rejection sampling) run through the serving stack as rollouts of
mode ``warm_start``; the gateway records their tokens, a teacher's given reply included (``rltrain_completion``);
those whose reward is at least ``min_reward`` become rows through the same trajectory adapter as RL. So training
uses exactly the recorded tokens (nothing is re-tokenised) and the loss mask is the RL one: the dataset holds
``input_ids = prompt_ids + completion_ids`` and ``assistant_masks = [0] * len(prompt_ids) + env_mask``, which
TRL turns into labels that are -100 everywhere but on the assistant's tokens.

Two uses: ``algorithm: sft`` (:func:`train_sft_run`, a run of its own, validated before and after), and a
``warm_start:`` block before GRPO (:func:`warm_start`, called by :func:`rltrain.algorithms.grpo.train_grpo`,
which then continues training the same adapter).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback, TrainerControl, TrainerState
from trl import SFTConfig, SFTTrainer

from rltrain.adapters.advantages import answer_distribution
from rltrain.adapters.trajectories import TrajectoryAdapter
from rltrain.algorithms.progress import quiet_progress
from rltrain.algorithms.run_state import accuracies, keep_if_best, settle_interrupted
from rltrain.algorithms.shared_prompt import shared_prefix_inputs
from rltrain.distributed import world_size
from rltrain.metrics import EvalSummary, MetricsWriter, peak_rss_mb, plot_run, rewrite_metrics
from rltrain.recipes import LoraConfig, SFTSection, WarmStartConfig
from rltrain.runner import Runner
from rltrain.serving import ServingStack
from rltrain.types import Span, SpanKind, Task, Trajectory

if TYPE_CHECKING:
    from datasets import Dataset

    from rltrain.run_context import RunContext

logger = logging.getLogger(__name__)

#: where the warm-start adapter is saved inside the run directory
WARM_START_DIR = "warm_start"
#: written after the adapter: its presence means the warm start finished (a resumed run loads it)
DONE_MARKER = "rltrain_warm_start.json"
#: the metric events the warm-start stage logs
_STAGE_EVENTS = ("baseline", "demonstrations", "sft", "sft_done")


class WarmStartError(RuntimeError):
    """The warm start has nothing to train on, or its rollouts mostly failed."""


@dataclass
class WarmStart:
    """The result of the warm-start stage: the trainable adapter model, the SFT steps it took, and whether it
    was trained by this process (``False``: loaded from an earlier, interrupted process of the run)."""

    model: Any
    steps: int
    fresh: bool = True


# -- demonstrations -----------------------------------------------------------------------------------------
def collect_demonstrations(
    rl: RunContext, stack: ServingStack, config: WarmStartConfig
) -> tuple[list[Trajectory], dict[str, Any]]:
    """Run the configured sources through ``stack`` and keep the rewarded rollouts as rows.

    Returns the rows and metrics per source (``warm_start/<source>/...``: rollouts collected and kept, rows,
    assistant tokens, the answer distribution of the kept ones, and the runner's counts).
    """
    spec = config.tasks or rl.recipe.data.train
    if spec is None:
        raise ValueError("warm_start.tasks and data.train are both unset: the warm start needs tasks to run on")
    tasks = rl.load_tasks(spec)
    rows: list[Trajectory] = []
    metrics: dict[str, Any] = {}
    for source in config.sources:
        source_rows, source_metrics = _collect(rl, stack, config, source, tasks)
        rows += source_rows
        metrics.update(source_metrics)
    if not rows:
        raise WarmStartError(
            f"no demonstrations: none of the rollouts from {config.sources} on {spec!r} earned "
            f"min_reward={config.min_reward}; see the rollouts of mode 'warm_start' in the store, "
            "and add the `teacher` source when the model itself is never right"
        )
    return rows, metrics


def _collect(
    rl: RunContext, stack: ServingStack, config: WarmStartConfig, source: str, tasks: list[Task]
) -> tuple[list[Trajectory], dict[str, Any]]:
    recipe = rl.recipe
    if source == "teacher":  # a teacher gives its replies; sampling does not apply, greedy is the plain choice
        # a teacher agent of your own reads the agent's prompts; an environment's teacher mode its own
        agent, sampling, per_task = rl.teacher(config), recipe.sampling.eval, 1
        mode = recipe.env.mode if config.teacher else config.teacher_mode
    else:
        agent, mode, sampling, per_task = rl.agent(), recipe.env.mode, recipe.sampling.train, config.samples_per_task
    resources = rl.resources(stack.model_name, sampling, prompts=rl.prompts(mode))
    runner = Runner(rl.store, agent, stack.url, recipe.runner, progress=rl.progress,
                    on_finished=stack.release)
    result = asyncio.run(runner.run(tasks, resources, mode="warm_start", group_size=per_task,
                                    desc=f"warm start: {source}"))
    stats = result.stats
    if stats.total and stats.failed_fraction > recipe.runner.max_failed_fraction:
        raise WarmStartError(
            f"warm start ({source}): {stats.failed + stats.timed_out} of {stats.total} rollouts failed or timed "
            f"out (more than runner.max_failed_fraction={recipe.runner.max_failed_fraction}); see the exception "
            "spans in the store for the reasons"
        )
    kept = [r for r in result.rollouts if r.reward is not None and r.reward >= config.min_reward]
    spans = {r.rollout_id: rl.store.get_spans(r.rollout_id, r.attempt_count) for r in kept}
    for setting, limit in reply_limits(recipe).items():
        check_replies_fit(source, spans, setting, limit)
    adapted = TrajectoryAdapter().adapt_many((r, spans[r.rollout_id]) for r in kept)
    answers = answer_distribution([rl.env.answer_of(spans[r.rollout_id]) for r in kept])
    logger.info("warm start (%s): kept %d of %d rollouts (reward >= %s); answers %s", source, len(kept),
                len(result.rollouts), config.min_reward, {k: round(v, 3) for k, v in answers.items()})
    prefix = f"warm_start/{source}/"
    return adapted.rows, {
        **stats.as_metrics(prefix),
        f"{prefix}collected": len(result.rollouts),
        f"{prefix}kept": len(kept),
        f"{prefix}rows": len(adapted.rows),
        f"{prefix}assistant_tokens": adapted.policy_tokens,
        f"{prefix}answer_distribution": answers,
    }


def reply_limits(recipe: Any) -> dict[str, int]:
    """The ``max_tokens`` settings the trained policy's replies will be sampled with: ``sampling.eval`` always,
    ``sampling.train`` too when RL follows the warm start."""
    limits = {"sampling.eval.max_tokens": recipe.sampling.eval.max_tokens}
    if recipe.algorithm is not None and recipe.algorithm.name in ("grpo", "ppo"):
        limits["sampling.train.max_tokens"] = recipe.sampling.train.max_tokens
    return limits


def check_replies_fit(source: str, spans_of: dict[str, list[Span]], setting: str, limit: int) -> None:
    """Refuse demonstrations with a reply longer than ``limit`` tokens (its end-of-turn token included).

    The policy samples at most ``limit`` tokens a reply, so it could never write such a demonstration whole:
    after the warm start its every reply would be cut before it ends (a tool call before ``</tool_call>``)
    and graded wrong, while the demonstrations looked fine. Better to stop before training on them."""
    too_long = [
        (len(span.attributes["completion_ids"]), rollout_id)
        for rollout_id, spans in spans_of.items()
        for span in spans
        if span.kind == SpanKind.LLM and len(span.attributes.get("completion_ids", ())) > limit
    ]
    if too_long:
        longest, rollout_id = max(too_long)
        raise WarmStartError(
            f"warm start ({source}): {len(too_long)} demonstration replies are longer than {setting}={limit} "
            f"tokens (the longest: {longest} tokens with its end-of-turn token, in rollout {rollout_id}), so the "
            f"policy could never write them whole; raise {setting} to at least {longest}"
        )


def sft_dataset(rows: list[Trajectory], max_length: int) -> tuple[Dataset, dict[str, float]]:
    """The pre-tokenised SFT dataset: ``input_ids`` and ``assistant_masks`` (1 = the assistant wrote it).

    A row longer than ``max_length`` is refused, not cut: a demonstration ends with the assistant's answer, so a
    cut one teaches the turns before it (a tool call) and never the answer."""
    from datasets import Dataset

    too_long = [len(row.prompt_ids) + len(row.completion_ids) for row in rows
                if len(row.prompt_ids) + len(row.completion_ids) > max_length]
    if too_long:
        raise WarmStartError(
            f"{len(too_long)} of {len(rows)} demonstrations are longer than max_length={max_length} tokens (the "
            f"longest: {max(too_long)}); they are not cut, since a cut demonstration loses its final answer: raise "
            f"the warm start's max_length to at least {max(too_long)}"
        )
    input_ids = [row.prompt_ids + row.completion_ids for row in rows]
    masks = [[0] * len(row.prompt_ids) + row.env_mask for row in rows]
    metrics = {"sft/rows": float(len(rows)), "sft/longest_row": float(max(map(len, input_ids), default=0))}
    return Dataset.from_dict({"input_ids": input_ids, "assistant_masks": masks}), metrics


# -- training -----------------------------------------------------------------------------------------------
class _LogToMetrics(TrainerCallback):
    """TRL's training logs (loss, learning rate, grad norm, ...) as ``sft`` records of metrics.jsonl.

    Their ``step`` is ``None`` and the SFT step is ``sft_step``: the warm start comes before a GRPO run's
    step 0, and a resumed GRPO run keeps every line whose step is not after its checkpoint."""

    def __init__(self, metrics: MetricsWriter) -> None:
        self.metrics = metrics

    def on_log(self, args: Any, state: TrainerState, control: TrainerControl, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        if logs:
            self.metrics.write({"event": "sft", "sft_step": state.global_step, **logs})


class SharedPrefixSFTTrainer(SFTTrainer):
    """``trl.SFTTrainer`` that runs the prefix all rows of a batch share once (:func:`.shared_prompt.shared_prefix_inputs`):
    the same loss and gradients in half the time a step on tool-mode demonstrations, whose ~510-token system prompt,
    tool schema and request opening are in every row (``benchmarks/bench_sft_prefix.py``: 2.1x). TRL's loss, metrics
    and token counts run unchanged on the rest of the rows."""

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        if self.model.training and not return_outputs:  # TRL recomputes outputs from these inputs: keep them whole
            shared = shared_prefix_inputs(model, inputs)
            if shared is not None:
                self._metrics["train"]["shared_prefix/tokens"].append(
                    inputs["input_ids"].size(1) - shared["input_ids"].size(1))  # type: ignore[union-attr]
                inputs = shared
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)


def build_sft_trainer(
    model: Any,
    tokenizer: Any,
    rows: list[Trajectory],
    config: WarmStartConfig,
    lora: LoraConfig,
    output_dir: Path,
    *,
    seed: int,
    progress: bool = True,
) -> tuple[Any, dict[str, float]]:
    """TRL's ``SFTTrainer`` over ``rows`` (its dataset already holds the labels), and the dataset's counters.

    ``model`` is a base model (a LoRA adapter is added with ``lora``'s settings) or a ``PeftModel`` whose adapter
    is trainable (training continues it).
    """
    import torch
    from accelerate.utils import is_peft_model
    from datasets import disable_progress_bars
    from transformers import set_seed

    if is_peft_model(model) and not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the PeftModel's adapter is frozen; load it with is_trainable=True to continue training it")
    dataset, data_metrics = sft_dataset(rows, config.max_length)
    param = next(model.parameters())
    on_cpu = param.device.type == "cpu"
    args = SFTConfig(
        output_dir=str(output_dir),
        use_cpu=on_cpu,
        bf16=not on_cpu and param.dtype == torch.bfloat16,
        fp16=not on_cpu and param.dtype == torch.float16,
        activation_checkpointing=not on_cpu,  # memory is what matters on GPU-sized models, speed on CPU
        seed=seed,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=config.learning_rate,
        max_length=config.max_length,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        dataloader_num_workers=0,
        disable_tqdm=not progress,
    )
    if not progress:  # TRL prepares the dataset with `datasets` maps, whose bars disable_tqdm does not reach
        disable_progress_bars()
    set_seed(seed)  # the new adapter's initial weights
    trainer_class = SharedPrefixSFTTrainer if config.share_prefix_forward else SFTTrainer
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=None if is_peft_model(model) else lora.to_peft(),
    )
    quiet_progress(trainer)  # logs go to metrics.jsonl, not stdout
    return trainer, data_metrics


def train_sft(
    model: Any,
    tokenizer: Any,
    rows: list[Trajectory],
    config: WarmStartConfig,
    lora: LoraConfig,
    output_dir: Path,
    *,
    seed: int,
    metrics: MetricsWriter | None = None,
    progress: bool = True,
) -> WarmStart:
    """Fine-tune a LoRA adapter on ``rows`` (loss on assistant tokens only) and save it to ``output_dir``;
    returns the ``PeftModel`` (see :func:`build_sft_trainer`) and the optimiser steps taken."""
    trainer, data_metrics = build_sft_trainer(model, tokenizer, rows, config, lora, output_dir, seed=seed,
                                              progress=progress)
    if metrics is not None:
        trainer.add_callback(_LogToMetrics(metrics))
    started = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - started
    steps = int(trainer.state.global_step)
    if metrics is not None:
        metrics.write({"event": "sft_done", **data_metrics, "sft/steps": steps, "sft/train_s": train_s})
    logger.info("SFT: %d steps on %d demonstrations in %.0f s", steps, len(trainer.train_dataset), train_s)
    trainer.model.save_pretrained(output_dir)
    return WarmStart(model=trainer.model, steps=steps)


# -- the warm-start stage and the SFT run -----------------------------------------------------------------
def warm_start(
    rl: RunContext, model: Any, tokenizer: Any, config: WarmStartConfig, lora: LoraConfig, *, resume: bool = False
) -> WarmStart:
    """The warm-start stage of a run: validate the base model (``baseline``, unless ``config.validate_base`` is
    off), collect demonstrations, train.

    With ``resume`` and a warm start that finished earlier in this run directory, its adapter is loaded instead
    (trainable), so an interrupted run does not collect and train again. Returns the adapter model.
    """
    from peft import PeftModel

    out = rl.run_dir / WARM_START_DIR
    marker = out / DONE_MARKER
    if resume and marker.exists():
        logger.info("resume: loading the warm-start adapter from %s", out)
        loaded = PeftModel.from_pretrained(model, str(out), is_trainable=True)
        return WarmStart(model=loaded, steps=int(json.loads(marker.read_text())["steps"]), fresh=False)
    recipe = rl.recipe
    # The stage runs whole again: lines an earlier, unfinished run of it logged would be counted twice.
    rewrite_metrics(rl.run_dir / "metrics.jsonl", keep=lambda rec: rec.get("event") not in _STAGE_EVENTS)
    with ServingStack(recipe, rl.store, model=model, tokenizer=tokenizer) as stack:
        if config.validate_base:
            baseline = rl.evaluate(rl.eval_sets(), stack=stack, label="baseline", step=0)
            logger.info("baseline: %s", accuracies(baseline))
        rows, collected = collect_demonstrations(rl, stack, config)
    rl.metrics.write({"event": "demonstrations", **collected})
    result = train_sft(model, tokenizer, rows, config, lora, out, seed=recipe.seed, metrics=rl.metrics,
                       progress=rl.progress)
    marker.write_text(json.dumps({"steps": result.steps, "rows": len(rows)}))
    return result


def train_sft_run(rl: RunContext, resume: bool = False) -> list[EvalSummary]:
    """``algorithm: sft``: baseline validation, demonstrations, SFT, final validation; the adapter is saved as
    ``final`` (and ``best`` when it beats the best so far)."""
    from rltrain.models import load_policy

    recipe = rl.recipe
    section = recipe.algorithm
    assert isinstance(section, SFTSection)
    if world_size() > 1:
        raise ValueError("algorithm: sft runs in one training process (its demonstrations and validation go "
                         f"through the one serving stack); launched with {world_size()}, drop accelerate launch")
    if resume:
        settle_interrupted(rl, None)
    rl.eval_sets()  # a bad task spec fails here, before the model is loaded
    model, tokenizer = load_policy(recipe.model.name, recipe.model.adapter, dtype=recipe.model.dtype,
                                   device=recipe.model.device, trainable=True)
    started = time.perf_counter()
    result = warm_start(rl, model, tokenizer, section, section.lora, resume=resume)
    train_s = time.perf_counter() - started
    result.model.save_pretrained(rl.run_dir / "final")
    with ServingStack(recipe, rl.store, model=result.model, tokenizer=tokenizer) as stack:
        final = rl.evaluate(rl.eval_sets(), stack=stack, label="final", step=result.steps)
    keep_if_best(rl.run_dir, result.model, final, result.steps, rl.recipe.data.select)
    rl.metrics.write({"event": "done", "train_s": train_s, "peak_rss_mb": peak_rss_mb()}, step=result.steps)
    plot_run(rl.run_dir / "metrics.jsonl", rl.run_dir / "plot.png")
    logger.info("final: %s (warm start %.0f s)", accuracies(final), train_s)
    return final

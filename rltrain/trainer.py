"""Trainer: the orchestration of a run — evaluation, training, resume — and nothing model-specific.

A run directory (``<output_dir>/<name>/``) is the unit of work: the resolved recipe, the store, the metrics,
evaluation summaries, checkpoints. The trainer wires environment, store, serving stack and runner together
from the recipe; algorithms (GRPO, PPO, APO) plug into it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

from rltrain.agent import Agent
from rltrain.algorithms.run_state import finished_run, finished_summaries
from rltrain.envs import Environment, get_env
from rltrain.metrics import EvalSummary, MetricsWriter, summarise
from rltrain.recipes import Recipe, RecipeError, dump_recipe
from rltrain.run_lock import RunDirLock
from rltrain.runner import Runner
from rltrain.serving import ServingStack, gateway_api_key
from rltrain.store import Store, open_store
from rltrain.types import LLMResource, PromptTemplate, Resources, Rollout, SamplingParams, Span, Task

logger = logging.getLogger(__name__)


class Trainer:
    """Evaluate (and, with an algorithm, train) an environment's agent as a recipe describes."""

    def __init__(self, recipe: Recipe, progress: bool = True) -> None:
        self.recipe = recipe
        self.progress = progress
        self.run_dir: Path = recipe.run_dir
        # one process per run directory, taken before anything in it is written (see rltrain.run_lock)
        self.lock = RunDirLock(self.run_dir).acquire()
        try:
            dump_recipe(recipe, self.run_dir / "recipe.yaml")
            self.env: Environment = get_env(recipe.env.name, **recipe.env.options)
            self.store: Store = open_store(recipe.store.kind, self.run_dir / "store.sqlite")
        except BaseException:
            self.lock.release()
            raise
        self.metrics = MetricsWriter(self.run_dir / "metrics.jsonl", run_name=recipe.name)
        self._eval_sets: dict[str, list[Task]] | None = None

    # -- resources ----------------------------------------------------------------------------------------
    def prompts(self, mode: str | None = None) -> dict[str, PromptTemplate]:
        """The default templates of ``mode`` (the recipe's agent mode by default) with the recipe's overrides
        (placeholders checked).

        The overrides are written for the recipe's agent; another mode (a warm-start teacher) takes those of
        the templates it shares with it, so that its demonstrations show the prompts the agent will be given.
        """
        agent_mode = self.recipe.env.mode
        mode = mode or agent_mode
        prompts = self.env.default_prompts(mode)
        for name, text in self.recipe.prompts.items():
            if name not in prompts:
                if mode != agent_mode:
                    continue
                raise ValueError(f"prompts.{name}: the {mode} agent has no prompt {name!r}; "
                                 f"its prompts are {sorted(prompts)}")
            prompts[name] = PromptTemplate(template=text, placeholders=prompts[name].placeholders)
        return prompts

    def resources(
        self, model_name: str, sampling: SamplingParams, version: int = 0,
        prompts: dict[str, PromptTemplate] | None = None,
    ) -> Resources:
        """Resources lent to the agent; the base URL is filled in per rollout by the runner."""
        return Resources(
            version=version,
            # the gateway's key (gateway.api_key_env), or the placeholder every OpenAI client needs
            llm=LLMResource(base_url="", model=model_name, sampling=sampling,
                            api_key=gateway_api_key(self.recipe) or "rltrain"),
            prompts=prompts if prompts is not None else self.prompts(),
        )

    def load_tasks(self, spec: str) -> list[Task]:
        """The tasks ``spec`` names (``data.limit`` applied); an empty set is an error, not a silent no-op."""
        tasks = self.env.load_tasks(spec)
        if self.recipe.data.limit is not None:
            tasks = tasks[: self.recipe.data.limit]
        if not tasks:
            raise RecipeError(f"task set {spec!r} has no tasks (an empty file?): nothing to train or evaluate on")
        return tasks

    # -- evaluation ---------------------------------------------------------------------------------------
    def evaluate(
        self,
        task_sets: dict[str, list[Task]],
        agent: Agent | None = None,
        stack: ServingStack | None = None,
        label: str = "eval",
        prompts: dict[str, PromptTemplate] | None = None,
        step: int | None = None,
    ) -> list[EvalSummary]:
        """Run ``agent`` (the recipe's by default) greedily over each task set, summarise, and record the
        summaries in ``metrics.jsonl`` and ``eval/<label>.json``.

        ``stack`` reuses a running engine + gateway (training does); without one, a stack is started for the
        duration unless the agent declares ``needs_llm=False`` (a solver), which needs no model.
        """
        agent = agent or self.env.agent(self.recipe.env.mode)
        if stack is None and agent.needs_llm:
            with ServingStack(self.recipe, self.store) as own:
                return self.evaluate(task_sets, agent, own, label, prompts, step)
        summaries = []
        for name, tasks in task_sets.items():
            summary, _ = self.run_set(name, tasks, stack, agent=agent, prompts=prompts, desc=f"{label} {name}")
            summaries.append(summary)
            self.metrics.write(
                {"event": label, **{f"{label}/{name}/{k}": v for k, v in summary.model_dump().items()
                                    if isinstance(v, int | float)}},
                step=step,
            )
        out = self.run_dir / "eval"
        out.mkdir(exist_ok=True)
        (out / f"{label}.json").write_text(json.dumps([s.model_dump() for s in summaries], indent=2))
        return summaries

    def run_set(
        self,
        name: str,
        tasks: list[Task],
        stack: ServingStack | None,
        agent: Agent | None = None,
        prompts: dict[str, PromptTemplate] | None = None,
        desc: str | None = None,
    ) -> tuple[EvalSummary, list[tuple[Rollout, list[Span]]]]:
        """One greedy pass of the agent over ``tasks``: its summary, and each rollout with its spans (what APO's
        critic reads). Nothing is written besides the store's records."""
        agent = agent or self.env.agent(self.recipe.env.mode)
        model_name = stack.model_name if stack is not None else self.recipe.model.name
        url = stack.url if stack is not None else None
        resources = self.resources(model_name, self.recipe.sampling.eval, prompts=prompts)
        runner = Runner(self.store, agent, url, self.recipe.runner, progress=self.progress,
                        on_finished=stack.release if stack is not None else None)
        start = time.perf_counter()
        result = asyncio.run(runner.run(tasks, resources, mode="eval", desc=desc or name))
        wall = time.perf_counter() - start
        spans = {r.rollout_id: self.store.get_spans(r.rollout_id, r.attempt_count) for r in result.rollouts}
        answers = {rid: self.env.answer_of(s) for rid, s in spans.items()}
        summary = summarise(name, result.rollouts, spans, answers, wall)
        return summary, [(r, spans[r.rollout_id]) for r in result.rollouts]

    # -- training -----------------------------------------------------------------------------------------
    def fit(self, resume: bool = False, stop_at: float | None = None) -> list[EvalSummary]:
        """Train with the recipe's algorithm (GRPO or PPO, optionally warm-started, or SFT); validate before, every
        ``eval_steps`` (GRPO/PPO) and after.

        With ``resume`` the newest checkpoint in the run directory is loaded (adapter, optimiser, scheduler,
        RNG, step) and training continues from its step; rollouts and metric lines of the interrupted step
        are settled first so nothing is counted twice. Returns the final validation summaries.
        ``stop_at``: GRPO/PPO skip their RL steps when the warm start already reaches this accuracy.
        """
        if self.recipe.algorithm is None:
            raise RecipeError(f"{self.run_dir / 'recipe.yaml'}: no `algorithm:` section (an evaluation run); "
                              "`rltrain eval` runs it, `train` and `resume` need one")
        max_steps = getattr(self.recipe.algorithm, "max_steps", None) if self.recipe.algorithm.name in ("grpo", "ppo") else None
        if resume and finished_run(self.run_dir, max_steps) is not None:
            logger.info("%s finished already (its metrics.jsonl has the `done` line); nothing to resume", self.run_dir)
            return finished_summaries(self.run_dir, self.recipe.data.select)
        if self.recipe.algorithm.name == "apo":
            from rltrain.algorithms.apo import train_apo

            return train_apo(self, resume=resume)
        if self.recipe.algorithm.name == "sft":
            from rltrain.algorithms.sft import train_sft_run

            return train_sft_run(self, resume=resume)
        if self.recipe.algorithm.name == "ppo":
            from rltrain.algorithms.ppo import train_ppo

            return train_ppo(self, resume=resume, stop_at=stop_at)
        from rltrain.algorithms.grpo import train_grpo

        return train_grpo(self, resume=resume, stop_at=stop_at)

    def eval_sets(self) -> dict[str, list[Task]]:
        """The validation sets: ``data.val``, every ``data.extra_eval``, and last ``data.select`` when the recipe
        has one (resolved once per run)."""
        if self._eval_sets is None:
            data = self.recipe.data
            specs = [data.val, *data.extra_eval, *([data.select] if data.select else [])]
            self._eval_sets = {spec: self.load_tasks(spec) for spec in specs}
        return self._eval_sets

    def close(self) -> None:
        try:
            self.store.close()
        finally:
            self.lock.release()

"""RunContext: what an algorithm gets from the run it trains in, and nothing more.

The Trainer builds one per run and hands it to the algorithm's ``fit``; the algorithm reads the recipe, the run
directory, the store and the metrics from it, asks it for agents, prompts, resources and task sets, and evaluates
through it. Algorithms start their own serving stack and runner (both below them) and never see the Trainer, so
imports run one way: Trainer -> algorithm -> RunContext -> serving stack, runner, store, environment.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rltrain.agent import Agent, resolve_agent
from rltrain.envs.base import Environment
from rltrain.metrics import EvalSummary, MetricsWriter, summarise
from rltrain.recipes import Recipe, RecipeError
from rltrain.runner import Runner
from rltrain.serving import ServingStack, gateway_api_key
from rltrain.store import Store
from rltrain.types import LLMResource, PromptTemplate, Resources, Rollout, SamplingParams, Span, Task


@dataclass
class RunContext:
    """One run's recipe, store, metrics and task family (``env``: a packaged environment, or your own agent
    wrapped by :class:`rltrain.envs.agent_env.AgentEnv`)."""

    recipe: Recipe
    env: Environment
    store: Store
    metrics: MetricsWriter
    progress: bool = True
    _eval_sets: dict[str, list[Task]] | None = field(default=None, repr=False)

    @property
    def run_dir(self) -> Path:
        return self.recipe.run_dir

    # -- agents and resources -----------------------------------------------------------------------------
    def agent(self, mode: str | None = None) -> Agent:
        """The agent of ``mode`` (the recipe's agent mode by default)."""
        return self.env.agent(mode or self.recipe.env.mode)

    def teacher(self, config: Any = None) -> Agent:
        """The warm start's teacher: ``config.teacher`` (any ``@rollout`` function) when set, else the
        environment's agent of mode ``config.teacher_mode``. ``config``: the warm start being run (the recipe's
        ``warm_start:``, or its SFT ``algorithm:``, when not given)."""
        config = config or self.recipe.warm_start or self.recipe.algorithm
        reference = getattr(config, "teacher", None)
        if reference:
            return resolve_agent(reference)
        return self.env.agent(getattr(config, "teacher_mode", "teacher"))

    def answer_of(self, spans: list[Span]) -> str | None:
        return self.env.answer_of(spans)

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

    # -- tasks ----------------------------------------------------------------------------------------------
    def load_tasks(self, spec: str) -> list[Task]:
        """The tasks ``spec`` names (``data.limit`` applied); an empty set is an error, not a silent no-op."""
        tasks = self.env.load_tasks(spec)
        if self.recipe.data.limit is not None:
            tasks = tasks[: self.recipe.data.limit]
        if not tasks:
            raise RecipeError(f"task set {spec!r} has no tasks (an empty file?): nothing to train or evaluate on")
        return tasks

    def eval_sets(self) -> dict[str, list[Task]]:
        """The validation sets: ``data.val``, every ``data.extra_eval``, and last ``data.select`` when the recipe
        has one (resolved once per run)."""
        if self._eval_sets is None:
            data = self.recipe.data
            specs = [data.val, *data.extra_eval, *([data.select] if data.select else [])]
            self._eval_sets = {spec: self.load_tasks(spec) for spec in specs}
        return self._eval_sets

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
        agent = agent or self.agent()
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
        agent = agent or self.agent()
        model_name = stack.model_name if stack is not None else self.recipe.model.name
        url = stack.url if stack is not None else None
        resources = self.resources(model_name, self.recipe.sampling.eval, prompts=prompts)
        runner = Runner(self.store, agent, url, self.recipe.runner, progress=self.progress,
                        on_finished=stack.release if stack is not None else None)
        start = time.perf_counter()
        result = asyncio.run(runner.run(tasks, resources, mode="eval", desc=desc or name))
        wall = time.perf_counter() - start
        spans = {r.rollout_id: self.store.get_spans(r.rollout_id, r.attempt_count) for r in result.rollouts}
        answers = {rid: self.answer_of(s) for rid, s in spans.items()}
        if self.env.answer_space() is None and not any(answers.values()):
            answers = {}  # an open-ended agent that reports no answers: no answer diagnostics, not "0% parseable"
        summary = summarise(name, result.rollouts, spans, answers, wall)
        return summary, [(r, spans[r.rollout_id]) for r in result.rollouts]

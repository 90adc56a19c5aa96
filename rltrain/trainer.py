"""Trainer: bring your own agent, train it, evaluate it; the orchestration of a run and nothing model-specific.

    trainer = Trainer(algorithm=GRPO(max_steps=20), model="SmolLM2-135M-Instruct", run_dir="runs/mine",
                      initial_resources={"prompt_template": PromptTemplate(template=..., placeholders=[...])})
    trainer.fit(my_agent, train_dataset="train.jsonl", val_dataset=val_rows)
    trainer.evaluate(my_agent, test_rows)
    trainer.dev(my_agent, val_rows)          # a few rollouts with their transcripts printed

The arguments are the recipe's sections (``rltrain.recipes``), so ``Trainer.from_recipe("recipe.yaml")`` and
``rltrain train recipe.yaml`` build the same objects. A run directory is the unit of work: the resolved recipe,
the store, the metrics, evaluation summaries, checkpoints. The Trainer holds the algorithm (a recipe section) and
calls its ``fit`` with a :class:`~rltrain.run_context.RunContext`; algorithms never import the Trainer.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Self

from rltrain.agent import Agent, register_agent, resolve_agent
from rltrain.algorithms.run_state import finished_run, finished_summaries
from rltrain.distributed import is_main
from rltrain.envs import get_env
from rltrain.envs.agent_env import AgentEnv
from rltrain.metrics import EvalSummary, MetricsWriter
from rltrain.recipes import (
    AlgorithmConfig,
    EnvConfig,
    Recipe,
    RecipeError,
    dump_recipe,
    load_recipe,
    parse_recipe,
)
from rltrain.run_context import RunContext
from rltrain.run_lock import RunDirLock
from rltrain.store import Store, open_store
from rltrain.task_data import load_task_data, write_jsonl
from rltrain.types import PromptTemplate, Task

logger = logging.getLogger(__name__)

#: where in-memory datasets are written inside the run directory, so that the recorded recipe names them
TASKS_DIR = "tasks"


def _prompt_texts(initial_resources: dict[str, Any] | None) -> dict[str, str]:
    texts = {}
    for name, value in (initial_resources or {}).items():
        if isinstance(value, PromptTemplate):
            texts[name] = value.template
        elif isinstance(value, str):
            texts[name] = value
        else:
            raise TypeError(f"initial_resources[{name!r}]: expected a PromptTemplate or a str, got "
                            f"{type(value).__name__} (the LLM resource is the run's model: `model=`)")
    return texts


def agent_modules_next_to(path: str | Path) -> None:
    """A recipe's own ``agent:`` (or teacher) module may sit next to the recipe file: make that folder importable."""
    folder = str(Path(path).resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)


def _as_dict(value: Any) -> Any:
    return value.model_dump() if hasattr(value, "model_dump") else value


class Trainer:
    """Train (``fit``), evaluate or dry-run (``dev``) an agent, configured like a recipe.

    ``algorithm``: ``APO(...)``, ``SFT(...)``, ``GRPO(...)``, ``PPO(...)`` or ``None`` (evaluation only); a
    whole :class:`~rltrain.recipes.Recipe` is accepted too (``Trainer.from_recipe`` reads one from YAML).
    ``model``: an alias, folder or cached Hugging Face id, or the ``model`` section as a dict
    (``{"name": ..., "adapter": "runs/x/best"}``). ``run_dir``: the run directory (default ``runs/run``).
    ``initial_resources``: the agent's prompt templates by name. ``n_runners``: rollouts in flight at once
    (``runner.concurrency``). Any other recipe section is a keyword: ``sampling=``, ``warm_start=``,
    ``engine=``, ``runner=``, ``seed=``, ...
    """

    def __init__(
        self,
        algorithm: AlgorithmConfig | Recipe | None = None,
        *,
        model: str | dict[str, Any] | Any = None,
        run_dir: str | Path | None = None,
        initial_resources: dict[str, Any] | None = None,
        n_runners: int | None = None,
        progress: bool = True,
        **sections: Any,
    ) -> None:
        if isinstance(algorithm, Recipe):
            if model is not None or run_dir is not None or initial_resources or n_runners or sections:
                raise TypeError("Trainer(recipe) takes the whole configuration from the recipe; pass no other "
                                "sections")
            recipe = algorithm
        else:
            recipe = self._recipe(algorithm, model, run_dir, initial_resources, n_runners, sections)
        self.recipe = recipe
        self.progress = progress
        self.run_dir: Path = recipe.run_dir
        # one process per run directory, taken before anything in it is written (see rltrain.run_lock); in a
        # multi-process run the main process holds it for all its ranks and is their one writer (rltrain.distributed)
        self.lock = RunDirLock(self.run_dir).acquire() if is_main() else None
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if is_main():
                dump_recipe(recipe, self.run_dir / "recipe.yaml")
            self.store: Store = open_store(recipe.store.kind, self.run_dir / "store.sqlite")
        except BaseException:
            if self.lock is not None:
                self.lock.release()
            raise
        report_to = recipe.algorithm.report_to if recipe.algorithm is not None else []
        self.metrics = MetricsWriter(self.run_dir / "metrics.jsonl", report_to=report_to, run_name=recipe.name)
        self._run: RunContext | None = None

    @staticmethod
    def _recipe(algorithm: AlgorithmConfig | None, model: Any, run_dir: str | Path | None,
                initial_resources: dict[str, Any] | None, n_runners: int | None, sections: dict[str, Any]) -> Recipe:
        data: dict[str, Any] = {key: _as_dict(value) for key, value in sections.items()}
        if algorithm is not None:
            if not isinstance(algorithm, AlgorithmConfig):
                raise TypeError(f"algorithm: expected APO(...), SFT(...), GRPO(...) or PPO(...), got "
                                f"{type(algorithm).__name__}")
            data["algorithm"] = algorithm.model_dump()
        if model is not None:
            data["model"] = {"name": model} if isinstance(model, str) else _as_dict(model)
        if run_dir is not None:
            path = Path(run_dir)
            data["output_dir"], data["name"] = str(path.parent), path.name
        if initial_resources:
            data["prompts"] = _prompt_texts(initial_resources)
        if n_runners is not None:
            data.setdefault("runner", {})["concurrency"] = n_runners
        return parse_recipe(data, "Trainer(...)")

    @classmethod
    def from_recipe(cls, path: str | Path, overrides: list[str] | None = None, progress: bool = True) -> Trainer:
        """The Trainer a recipe file describes (what ``rltrain train`` runs); a recipe's own ``agent:`` module
        may sit next to it."""
        recipe = load_recipe(path, overrides)
        agent_modules_next_to(path)
        return cls(recipe, progress=progress)

    # -- the run context ----------------------------------------------------------------------------------------
    @property
    def run(self) -> RunContext:
        """What the algorithm gets (built on first use, so that a recipe's environment loads only when needed)."""
        if self._run is None:
            recipe = self.recipe
            if recipe.agent is not None:
                env: Any = AgentEnv(resolve_agent(recipe.agent), recipe.prompts)
            else:
                env = get_env(recipe.env.name, **recipe.env.options)
            self._run = RunContext(recipe, env, self.store, self.metrics, progress=self.progress)
        return self._run

    def _task_path(self, dataset: Any, name: str) -> str:
        """A ``.jsonl`` path naming ``dataset`` (checked now: a bad row fails before any model loads); in-memory
        datasets are written to ``<run_dir>/tasks/<name>.jsonl``."""
        tasks = load_task_data(dataset, name=name)
        if isinstance(dataset, str | Path):
            return str(Path(dataset).resolve())
        return str(write_jsonl(tasks, self.run_dir / TASKS_DIR / f"{name}.jsonl").resolve())

    def _bind(self, agent: Any = None, **datasets: Any) -> None:
        """Point the recipe at ``agent`` and the datasets given (``train``, ``val``), and record it."""
        update: dict[str, Any] = {}
        if agent is not None:
            if self.recipe.agent is None and self.recipe.env != EnvConfig():
                raise RecipeError(f"this run's agents come from env {self.recipe.env.name!r}; fit/evaluate "
                                  "take no agent then (or build the Trainer without `env`)")
            update["agent"] = register_agent(agent)
        data = {key: self._task_path(value, key) for key, value in datasets.items() if value is not None}
        if data:
            update["data"] = self.recipe.data.model_copy(update=data)
        if not update:
            return
        if self.recipe.agent is None and "agent" not in update:
            raise RecipeError("datasets need your agent: fit/evaluate/dev(agent, dataset), or `agent:` in the recipe")
        self.recipe = self.recipe.model_copy(update=update)
        if is_main():
            dump_recipe(self.recipe, self.run_dir / "recipe.yaml")
        self._run = None

    # -- the public API -------------------------------------------------------------------------------------
    def fit(self, agent: Agent | Any = None, train_dataset: Any = None, val_dataset: Any = None, *,
            resume: bool = False, stop_at: float | None = None) -> list[EvalSummary]:
        """Train ``agent`` (a ``@rollout`` function; the recipe's when omitted) on ``train_dataset``, validating
        on ``val_dataset`` before, every ``eval_steps`` and after. Datasets: a ``.jsonl`` path, a list of dicts or
        a ``datasets.Dataset``. Returns the final validation summaries.

        With ``resume`` the newest checkpoint in the run directory is loaded (adapter, optimiser, scheduler, RNG,
        step) and training continues from its step. ``stop_at``: GRPO/PPO skip their RL steps when the warm start
        already reaches this accuracy.
        """
        self._bind(agent, train=train_dataset, val=val_dataset)
        if self.recipe.algorithm is None:
            raise RecipeError(f"{self.run_dir / 'recipe.yaml'}: no algorithm (an evaluation run): "
                              "Trainer(algorithm=GRPO(...)) or a recipe's `algorithm:` section trains, and `resume` "
                              "needs one; evaluate() needs none")
        algorithm = self.recipe.algorithm
        max_steps = getattr(algorithm, "max_steps", None) if algorithm.name in ("grpo", "ppo") else None
        if resume and finished_run(self.run_dir, max_steps) is not None:
            logger.info("%s finished already (its metrics.jsonl has the `done` line); nothing to resume", self.run_dir)
            return finished_summaries(self.run_dir, self.recipe.data.select)
        return self.recipe.algorithm.fit(self.run, resume=resume, stop_at=stop_at)

    def _tasks(self, dataset: Any) -> dict[str, list[Task]]:
        if dataset is None:
            return self.run.eval_sets()
        name = Path(dataset).stem if isinstance(dataset, str | Path) else "dataset"
        tasks = load_task_data(dataset, name=name)
        limit = self.recipe.data.limit
        return {name: tasks[:limit] if limit is not None else tasks}

    def evaluate(self, agent: Agent | Any = None, dataset: Any = None, *, label: str = "eval") -> list[EvalSummary]:
        """Run ``agent`` (the recipe's when omitted) greedily on ``dataset`` (the recipe's validation sets when
        omitted) on the run's model (``model.adapter`` applied); summaries are saved as ``eval/<label>.json``."""
        self._bind(agent)
        return self.run.evaluate(self._tasks(dataset), label=label)

    def dev(self, agent: Agent | Any = None, dataset: Any = None, n: int = 2) -> list[EvalSummary]:
        """A dry run: ``n`` greedy rollouts of ``agent`` on the first tasks of ``dataset``, each transcript
        (messages, tool calls, the model's output, errors, the reward) printed, so an agent can be debugged
        before any training."""
        from rich.console import Console
        from rich.panel import Panel

        from rltrain.adapters.transcripts import transcript_of
        from rltrain.serving import ServingStack

        self._bind(agent)
        run = self.run
        sets = {name: tasks[:n] for name, tasks in self._tasks(dataset).items()}
        name, tasks = next(iter(sets.items()))
        console = Console()
        with ServingStack(self.recipe, self.store) as stack:
            summary, rollouts = run.run_set(name, tasks, stack, desc=f"dev {name}")
        for rollout, spans in rollouts:
            console.print(Panel(transcript_of(rollout, spans).render(max_chars=8000), title=f"task {rollout.task.id}",
                                subtitle=f"{rollout.status} reward {rollout.reward}"))
        return [summary]

    def close(self) -> None:
        try:
            self.store.close()
        finally:
            if self.lock is not None:
                self.lock.release()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

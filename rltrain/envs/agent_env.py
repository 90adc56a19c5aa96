"""Your own agent as a task family: a ``@rollout`` function, task files and prompts, no Environment class.

This is what ``trainer.fit(agent, train_dataset, val_dataset)`` and a recipe's ``agent: module:attribute`` run
on. Tasks are ``.jsonl`` files (``rltrain.task_data``; in-memory datasets are written into the run directory
first), the prompts are the run's ``initial_resources`` / ``prompts:``, and the answer of a rollout is what the
agent reported with :func:`rltrain.emit_answer`.
"""

from __future__ import annotations

from rltrain.agent import Agent, answer_of
from rltrain.task_data import load_task_data
from rltrain.types import PromptTemplate, Span, Task


class MissingAgentError(ValueError):
    """A warm start asked for a teacher, or ``eval --agent solver`` for a reference solver, that the run lacks."""


class AgentEnv:
    """The Environment protocol around one user agent (and, for warm starts, a teacher)."""

    def __init__(self, agent: Agent, prompts: dict[str, str] | None = None) -> None:
        self._agent = agent
        self.name = agent.name
        self._prompts = dict(prompts or {})

    def load_tasks(self, spec: str) -> list[Task]:
        """``spec`` is a ``.jsonl`` path."""
        return load_task_data(spec, name=spec)

    def agent(self, mode: str) -> Agent:
        if mode == "teacher":
            raise MissingAgentError(
                "the warm start's `teacher` source needs a teacher agent: SFT(teacher=my_teacher) in Python, "
                "`teacher: module:attribute` in the recipe's warm_start/algorithm section"
            )
        return self._agent

    def reference_agent(self) -> Agent:
        raise MissingAgentError(f"agent {self.name!r} comes with no reference solver (that is an environment's part)")

    def default_prompts(self, mode: str) -> dict[str, PromptTemplate]:
        """The run's prompts; the placeholders of each are the ``{names}`` its text uses."""
        return {name: PromptTemplate(template=text, placeholders=sorted(PromptTemplate.fields_of(text)))
                for name, text in self._prompts.items()}

    def answer_space(self) -> None:
        return None

    def answer_of(self, spans: list[Span]) -> str | None:
        return answer_of(spans)

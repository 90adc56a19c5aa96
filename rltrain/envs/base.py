"""The Environment protocol: what the trainer and the CLI need from a task family, and nothing more.

An environment bundles the tasks, the agents that solve them, their default prompts and the vocabulary of
answers, so that ``rltrain`` can train, evaluate and diagnose any task family through one interface. The
trainer never imports a particular environment; it asks :func:`rltrain.envs.get_env` for one by name.

Your own agent needs none of this: ``trainer.fit(my_agent, train, val)`` (or ``agent: module:attribute`` in a
recipe) wraps a bare ``@rollout`` function in :class:`rltrain.envs.agent_env.AgentEnv`. An Environment is for
packaged task families (room selection) that bring their own task specs, agents, teacher and solver.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from rltrain.agent import Agent
from rltrain.types import PromptTemplate, Span, Task


@runtime_checkable
class Environment(Protocol):
    """A task family: its tasks, agents, default prompts and answers."""

    name: str

    def load_tasks(self, spec: str) -> list[Task]:
        """The tasks a recipe string names (the environment documents its forms, e.g. ``public:val``)."""

    def agent(self, mode: str) -> Agent:
        """The agent of ``mode`` (the environment's own mode names; unknown ones raise ``ValueError``)."""

    def reference_agent(self) -> Agent:
        """An agent that needs no model and scores 1.0 on correctly labelled tasks (checks the plumbing)."""

    def default_prompts(self, mode: str) -> dict[str, PromptTemplate]:
        """The prompt templates the agent of ``mode`` reads from its resources, as a fresh copy."""

    def answer_space(self) -> list[str] | None:
        """Every answer the grader can give a choice, for answer-distribution diagnostics; ``None`` when the
        answers are open-ended."""

    def answer_of(self, spans: list[Span]) -> str | None:
        """The answer a rollout gave, read from its spans; ``None`` when it gave none that could be read."""

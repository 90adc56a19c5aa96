"""A tiny environment for APO tests: the reward depends only on the prompt template the agent was given.

The agent renders its ``instruction`` template for the task and earns the fraction of the words in ``GOOD_WORDS``
that the rendered prompt contains. It calls no model, so a template's score is a fixed, known number and the
beam search's choices can be checked exactly; it records the rendered prompt in a tool span, so the tests can
see which templates were ever run.
"""

from __future__ import annotations

from rltrain.agent import rollout, tool_span
from rltrain.types import PromptTemplate, Resources, Span, Task

GOOD_WORDS = ("carefully", "check", "capacity", "accessible")
SEED_TEMPLATE = "Pick a room for {topic}."


def template_score(text: str) -> float:
    """What any task scores under a rendered prompt ``text`` (the same for every task)."""
    words = set(text.lower().replace(".", " ").replace(",", " ").split())
    return sum(word in words for word in GOOD_WORDS) / len(GOOD_WORDS)


@rollout(name="keyword", needs_llm=False)
def keyword_agent(task: dict, resources: Resources) -> float:
    prompt = resources.prompts["instruction"].format(topic=task["topic"])
    with tool_span("render", {"topic": task["topic"]}) as call:
        call.result = prompt
    return template_score(prompt)


class KeywordEnv:
    """``n_tasks`` tasks; every mode runs :func:`keyword_agent`."""

    name = "keyword"

    def __init__(self, n_tasks: int = 6) -> None:
        self.n_tasks = n_tasks

    def load_tasks(self, spec: str) -> list[Task]:
        return [Task(id=f"{spec}-{i}", payload={"topic": f"meeting {i}"}) for i in range(self.n_tasks)]

    def agent(self, mode: str):
        return keyword_agent

    def reference_agent(self):
        return keyword_agent

    def default_prompts(self, mode: str) -> dict[str, PromptTemplate]:
        return {"instruction": PromptTemplate(template=SEED_TEMPLATE, placeholders=["topic"])}

    def answer_space(self) -> None:
        return None

    def answer_of(self, spans: list[Span]) -> None:
        return None

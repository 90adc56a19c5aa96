"""A tiny environment for training tests: the agent is a real ``@rollout`` program that calls the gateway with
the stock ``openai`` client, and its reward depends on what the model sampled (an even number of characters),
so about half of the samples earn 1.0 and GRPO groups / rejection sampling see real reward spread."""

from __future__ import annotations

from openai import OpenAI

from rltrain.agent import rollout
from rltrain.types import PromptTemplate, Resources, Span, Task


def even_length_reward(task: dict, resources: Resources, seed: int | None = None) -> float:
    """One call through the gateway; 1.0 when the reply has an even number of characters."""
    seeded = {} if seed is None else {"seed": seed}
    with OpenAI(base_url=resources.llm.base_url, api_key=resources.llm.api_key) as client:
        reply = client.chat.completions.create(
            model=resources.llm.model,
            messages=[{"role": "user", "content": resources.prompts["user"].format(word=task["word"])}],
            temperature=resources.llm.sampling.temperature,
            max_tokens=resources.llm.sampling.max_tokens,
            **seeded,
        )
    return 1.0 if len(reply.choices[0].message.content or "") % 2 == 0 else 0.0


@rollout
def even_length_agent(task: dict, resources: Resources) -> float:
    """Rewarded when the reply has an even number of characters."""
    return even_length_reward(task, resources)


class EvenLengthEnv:
    """``n_tasks`` tasks ``w0..``; every mode runs :func:`even_length_agent`."""

    name = "even_length"

    def __init__(self, n_tasks: int = 4) -> None:
        self.n_tasks = n_tasks

    def load_tasks(self, spec: str) -> list[Task]:
        return [Task(id=f"w{i}", payload={"word": f"word{i}"}) for i in range(self.n_tasks)]

    def agent(self, mode: str):
        return even_length_agent

    def reference_agent(self):
        return even_length_agent

    def default_prompts(self, mode: str) -> dict[str, PromptTemplate]:
        return {"user": PromptTemplate(template="Repeat {word}.", placeholders=["word"])}

    def answer_space(self) -> None:
        return None

    def answer_of(self, spans: list[Span]) -> None:
        return None

"""Chat calls to any OpenAI-compatible endpoint, with the token usage and cost of each stage kept.

APO's critic and editor are LLMs the user chooses: the OpenAI API, a ``vllm serve`` URL, or (the offline default)
rltrain's own gateway on the run's local model. All three speak the same protocol, so one client built on the
stock ``openai`` package serves them; what differs is only where it points and which key it sends.

Cost is bookkeeping, not billing: token counts come from each reply's ``usage`` and prices from the recipe's
``pricing`` table, so an escalation report can put "APO cost $0.004 in critic calls" next to "GRPO cost 40 GPU
minutes". Models missing from the table are local and cost 0.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from rltrain.recipes import LLMEndpointConfig, ModelPrice

logger = logging.getLogger(__name__)


class LLMEndpointError(RuntimeError):
    """An optimiser LLM could not be reached or answered with an error; the message names the endpoint."""


@dataclass
class Usage:
    """Tokens and calls spent by one stage (agent rollouts, critic calls, edit calls) on one model."""

    model: str
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, prompt_tokens: int, completion_tokens: int, calls: int = 1) -> None:
        self.calls += calls
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens

    def cost(self, pricing: dict[str, ModelPrice]) -> float:
        """Estimated cost from the recipe's price table (0 for a model not listed: a local model)."""
        price = pricing.get(self.model)
        if price is None:
            return 0.0
        return (self.prompt_tokens * price.input_per_mtok + self.completion_tokens * price.output_per_mtok) / 1e6

    def as_dict(self, pricing: dict[str, ModelPrice]) -> dict[str, Any]:
        return {
            "model": self.model, "calls": self.calls, "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens, "cost": self.cost(pricing),
        }


@dataclass
class UsageLedger:
    """Usage per named stage; what an APO run or an escalation rung reports."""

    stages: dict[str, Usage] = field(default_factory=dict)

    def stage(self, name: str, model: str) -> Usage:
        if name not in self.stages:
            self.stages[name] = Usage(model=model)
        return self.stages[name]

    def as_dict(self, pricing: dict[str, ModelPrice]) -> dict[str, dict[str, Any]]:
        return {name: usage.as_dict(pricing) for name, usage in self.stages.items()}

    @classmethod
    def from_dict(cls, data: dict[str, dict[str, Any]]) -> UsageLedger:
        return cls({
            name: Usage(model=u["model"], calls=u["calls"], prompt_tokens=u["prompt_tokens"],
                        completion_tokens=u["completion_tokens"])
            for name, u in data.items()
        })


class ChatLLM:
    """One endpoint and model; ``complete`` returns the reply text and charges ``usage`` (its own tally until a
    caller points it at a ledger's stage)."""

    def __init__(self, config: LLMEndpointConfig, local_url: str, local_model: str) -> None:
        """``local_url``/``local_model`` are the run's own gateway and model, used when the config names none."""
        from openai import OpenAI

        self.config = config
        self.base_url = config.base_url or f"{local_url.rstrip('/')}/v1"
        self.model = config.model or local_model
        api_key = "local"
        if config.api_key_env is not None:
            api_key = os.environ.get(config.api_key_env, "")
            if not api_key:
                raise LLMEndpointError(
                    f"api_key_env names {config.api_key_env!r}, but that environment variable is not set"
                )
        self.usage = Usage(model=self.model)
        self._client = OpenAI(base_url=self.base_url, api_key=api_key, timeout=config.timeout_s, max_retries=2)

    def complete(self, messages: list[dict[str, str]], seed: int | None = None) -> str:
        """One chat completion at the endpoint's temperature; the text of the first choice."""
        from openai import OpenAIError

        try:
            reply = self._client.chat.completions.create(
                model=self.model, messages=messages, temperature=self.config.temperature,  # type: ignore[arg-type]
                max_tokens=self.config.max_tokens, seed=seed,
            )
        except OpenAIError as exc:
            raise LLMEndpointError(f"{self.base_url} (model {self.model}): {type(exc).__name__}: {exc}") from exc
        if reply.usage is not None:
            self.usage.add(reply.usage.prompt_tokens, reply.usage.completion_tokens)
        else:
            self.usage.add(0, 0)
        return reply.choices[0].message.content or ""

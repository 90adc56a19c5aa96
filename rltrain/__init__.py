"""rltrain: make an LLM agent better at its job by training a local model's weights with RL.

Bring your own agent::

    from rltrain import GRPO, Trainer, rollout

    trainer = Trainer(algorithm=GRPO(max_steps=20), model="SmolLM2-135M-Instruct", run_dir="runs/mine")
    trainer.fit(my_agent, train_dataset="train.jsonl", val_dataset="val.jsonl")

Heavy libraries (torch, transformers, TRL) are imported lazily by the modules that need them, and the Trainer
(which pulls in the serving stack) on first use, so that ``import rltrain`` and ``rltrain --help`` stay fast.
"""

from typing import TYPE_CHECKING, Any

from rltrain.agent import emit_answer, emit_reward, reply_with, rollout, tool_span
from rltrain.types import (
    Attempt,
    LLMResource,
    PromptTemplate,
    Resources,
    Rollout,
    RolloutStatus,
    SamplingParams,
    Span,
    SpanKind,
    Task,
    Trajectory,
)

if TYPE_CHECKING:
    from rltrain.recipes import APOSection as APO
    from rltrain.recipes import GRPOSection as GRPO
    from rltrain.recipes import PPOSection as PPO
    from rltrain.recipes import SFTSection as SFT
    from rltrain.trainer import Trainer

__version__ = "0.1.0"


#: the algorithm configs: the recipe's ``algorithm:`` sections, by the names the Python API uses
_ALGORITHMS = {"APO": "APOSection", "GRPO": "GRPOSection", "PPO": "PPOSection", "SFT": "SFTSection"}


def __getattr__(name: str) -> Any:
    """The Trainer and the algorithm configs are imported on first use: the Trainer pulls in the serving stack,
    runner and store, the configs the recipe schema (YAML included)."""
    if name == "Trainer":
        from rltrain.trainer import Trainer

        return Trainer
    if name in _ALGORITHMS:
        from rltrain import recipes

        return getattr(recipes, _ALGORITHMS[name])
    raise AttributeError(f"module 'rltrain' has no attribute {name!r}")


__all__ = [
    "APO",
    "GRPO",
    "PPO",
    "SFT",
    "Attempt",
    "LLMResource",
    "PromptTemplate",
    "Resources",
    "Rollout",
    "RolloutStatus",
    "SamplingParams",
    "Span",
    "SpanKind",
    "Task",
    "Trainer",
    "Trajectory",
    "emit_answer",
    "emit_reward",
    "reply_with",
    "rollout",
    "tool_span",
]

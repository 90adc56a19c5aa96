"""rltrain: make an LLM agent better at its job by training a local model's weights with RL.

Heavy libraries (torch, transformers, TRL) are imported lazily by the modules that need them, so that
``import rltrain`` and ``rltrain --help`` stay fast.
"""

from rltrain.agent import emit_reward, rollout, tool_span
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

__version__ = "0.1.0"

__all__ = [
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
    "Trajectory",
    "emit_reward",
    "rollout",
    "tool_span",
]

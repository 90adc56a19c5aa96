"""The records that cross module boundaries: tasks, rollouts, attempts, spans, resources, trajectories.

Every record serialises to JSON (the store keeps them as JSON, the gateway returns them, the CLI prints them)
and validates on the way in: a malformed record is an error at the boundary where it was made, not a crash
three modules later. All are pydantic models except :class:`Task`, a slotted dataclass that checks itself (see
there why), which pydantic validates and serialises like a model wherever it is a field.
"""

from __future__ import annotations

import itertools
import os
import string
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

_ID_MASK = (1 << 64) - 1
_id_base = 0
_id_counter = itertools.count()


def _seed_ids() -> None:
    """A fresh random 64-bit starting point for this process's ids (at import, and again in a forked child,
    which would otherwise repeat its parent's ids)."""
    global _id_base, _id_counter
    _id_base = int.from_bytes(os.urandom(8), "big")
    _id_counter = itertools.count()


_seed_ids()
os.register_at_fork(after_in_child=_seed_ids)


def new_id(prefix: str) -> str:
    """A short id with a readable prefix (``ro-3f2a...``, 16 hex digits): unique across processes.

    Every rollout and span gets one, so it must be cheap: a per-process random 64-bit start (``os.urandom``)
    plus a counter, instead of a system call per id. Two processes collide only when their starts lie within
    the number of ids either makes, about ``2 * ids / 2**64``; ``next`` on an ``itertools.count`` is atomic
    under the GIL, so threads never share a value.
    """
    return f"{prefix}-{(_id_base + next(_id_counter)) & _ID_MASK:016x}"


_setattr = object.__setattr__  # how a frozen record sets its own fields


class _Record(BaseModel):
    """Base for records: unknown fields are errors, so a typo never silently drops data."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True, slots=True, init=False)
class Task:
    """One input of the dataset, with whatever its grader needs. ``payload`` is what the agent receives.

    Why not a pydantic model like the other records: callers make a task per dataset row and per rollout
    batch entry, and pydantic costs 1.3 µs to make one (its floor is about 1 µs, whatever the fields), about
    as much as the memory store then spends enqueueing the rollout. This class makes one in about 0.5 µs:
    ``__init__`` checks the fields itself (the generated dataclass ``__init__`` plus a ``__post_init__``
    would cost twice that) and keeps ``payload`` as given, without a copy, as a store keeps any record it is
    handed. As a field of a pydantic model (``Rollout.task``) it behaves like a model: an instance is taken
    as is, a dict (a store's JSON) is validated against the same rules (``__pydantic_config__``: unknown
    keys are errors), and it serialises to ``{"id": ..., "payload": {...}}``.
    """

    __pydantic_config__: ClassVar[ConfigDict] = ConfigDict(extra="forbid")

    id: str
    payload: dict[str, Any]

    def __init__(self, *, id: str, payload: dict[str, Any]) -> None:
        if not isinstance(id, str):
            raise TypeError(f"Task.id must be a str, got {type(id).__name__}: {id!r:.80}")
        if not isinstance(payload, dict):
            raise TypeError(
                f"Task.payload of task {id!r} must be a dict (a JSON object), got {type(payload).__name__}: "
                f"{payload!r:.80}"
            )
        for key in payload:
            if not isinstance(key, str):
                raise TypeError(
                    f"Task.payload of task {id!r} must have str keys (a JSON object's), got "
                    f"{type(key).__name__} key {key!r:.80}"
                )
        _setattr(self, "id", id)
        _setattr(self, "payload", payload)

    @classmethod
    def from_row(cls, row: dict[str, Any], index: int) -> Task:
        """A dataset row becomes a task; its ``id`` is kept when present, else the row index names it."""
        if not isinstance(row, dict):
            raise TypeError(f"task row {index} must be a JSON object, got {type(row).__name__}: {row!r:.80}")
        task_id = row.get("id", f"task-{index}")
        return cls(id=str(task_id), payload=row)


class RolloutStatus(StrEnum):
    """Lifecycle of a rollout. ``queued -> running -> (succeeded | failed | timed_out | cancelled)``;
    a failed or timed-out attempt with retries left goes back to ``queued``."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self not in (RolloutStatus.QUEUED, RolloutStatus.RUNNING)


class Attempt(_Record):
    """One try of a rollout. Retries create new attempts; spans name the attempt that made them."""

    rollout_id: str
    attempt_no: int
    status: RolloutStatus = RolloutStatus.RUNNING
    worker_id: str | None = None
    started_at: float = Field(default_factory=time.time)
    ended_at: float | None = None
    error: str | None = None


class Rollout(_Record):
    """One run of the agent on one task under one resources version."""

    rollout_id: str = Field(default_factory=lambda: new_id("ro"))
    task: Task
    status: RolloutStatus = RolloutStatus.QUEUED
    resources_version: int = 0
    mode: str = "train"
    #: the runner call that enqueued it; workers claim only their own batch
    batch_id: str | None = None
    group_id: str | None = None
    attempt_count: int = 0
    max_attempts: int = 1
    reward: float | None = None
    error: str | None = None
    created_at: float = Field(default_factory=time.time)
    started_at: float | None = None
    ended_at: float | None = None


class SpanKind(StrEnum):
    LLM = "llm"
    TOOL = "tool"
    REWARD = "reward"
    EXCEPTION = "exception"
    LOG = "log"


class Span(_Record):
    """One recorded step inside a rollout.

    ``attributes`` depends on ``kind``; llm spans carry the keys of :class:`LLMCallRecord`, tool spans
    ``arguments``/``result``/``error``, reward spans ``value``, exception spans ``type``/``message``/``traceback``.
    ``sequence`` orders spans of one rollout; the store assigns it when it is ``None``.
    """

    span_id: str = Field(default_factory=lambda: new_id("sp"))
    rollout_id: str
    attempt_no: int = 1
    sequence: int | None = None
    kind: SpanKind
    name: str
    parent_id: str | None = None
    start_time: float = Field(default_factory=time.time)
    end_time: float | None = None
    attributes: dict[str, Any] = Field(default_factory=dict)


class LLMCallRecord(_Record):
    """What the gateway records for one chat completion: the training signal lives here.

    ``prompt_ids``/``completion_ids`` are exactly the tokens the engine saw and sampled; ``logprobs`` has one
    entry per completion token. ``prefix_reused`` is true when ``prompt_ids`` starts with the previous turn's
    prompt + completion ids of the same rollout (decision 1 of the design); when it does not although the call
    continues the rollout's conversation, ``fork_cause`` says why (see ``rltrain.gateway.sessions.FORK_CAUSES``).
    ``teacher`` marks a reply that was
    given to the gateway (``rltrain_completion``, a demonstration) instead of sampled: its ``logprobs`` are all
    0.0, and it is data for supervised warm starts, never an on-policy sample.
    """

    model: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    text: str
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_error: str | None = None
    finish_reason: str
    usage: dict[str, int]
    policy_version: int = 0
    prefix_reused: bool = False
    fork_cause: str | None = None
    tag: str | None = None
    latency_s: float = 0.0
    choice_index: int = 0
    teacher: bool = False


class SamplingParams(_Record):
    """Sampling settings lent to the agent with the llm resource (the agent may pass them to its client)."""

    temperature: float = Field(default=0.0, ge=0.0, le=5.0, description="Sampling temperature (0 = greedy).")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling: keep this probability mass.")
    max_tokens: int = Field(default=64, ge=1, description="Longest completion of one model call, in tokens.")
    seed: int | None = Field(default=None, description="Sampling seed of each call (None = unseeded).")


class LLMResource(_Record):
    """Where the agent's OpenAI client points: a per-rollout base URL on the gateway and a model name."""

    base_url: str
    model: str
    api_key: str = "rltrain"
    sampling: SamplingParams = Field(default_factory=SamplingParams)

    def model_dump_public(self) -> dict[str, Any]:
        """The resource as JSON without the key: what the store and logs keep (no secret ever written)."""
        data = self.model_dump(mode="json")
        data["api_key"] = "***" if self.api_key not in ("", "rltrain") else self.api_key
        return data


class PromptTemplateError(ValueError):
    """A prompt template whose placeholders do not match what the agent will fill in."""


class PromptTemplate(_Record):
    """A ``str.format`` template whose ``{placeholders}`` are checked when it is built.

    ``placeholders`` lists the names the agent fills in. A template that uses a name not listed, or omits one
    listed, is rejected at construction, so APO can never run a candidate that would crash or ignore input.
    """

    template: str
    placeholders: list[str] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _infer_placeholders(cls, data: Any) -> Any:
        """Without ``placeholders`` the template's own ``{names}`` are the ones the agent fills in; Agent
        Lightning's ``engine="f-string"`` is the only engine there is and is accepted for its users' code."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        engine = data.pop("engine", "f-string")
        if engine != "f-string":
            raise PromptTemplateError(f"prompt template engine {engine!r}: only `f-string` (str.format) templates")
        if "placeholders" not in data and isinstance(data.get("template"), str):
            data["placeholders"] = sorted(cls.fields_of(data["template"]))
        return data

    @staticmethod
    def fields_of(template: str) -> set[str]:
        """The placeholder names a template uses; raises PromptTemplateError on broken braces."""
        try:
            parsed = list(string.Formatter().parse(template))
        except ValueError as exc:
            raise PromptTemplateError(f"prompt template has unbalanced braces: {exc}") from exc
        names: set[str] = set()
        for _, field, _, _ in parsed:
            if field is None:
                continue
            if field == "" or not field.isidentifier():
                raise PromptTemplateError(
                    f"prompt template placeholder {{{field}}} is not a plain name; use {{name}} and "
                    "double braces {{ }} for literal braces"
                )
            names.add(field)
        return names

    @model_validator(mode="after")
    def _check_placeholders(self) -> PromptTemplate:
        used = self.fields_of(self.template)
        declared = set(self.placeholders)
        if used - declared:
            raise PromptTemplateError(
                f"prompt template uses unknown placeholder(s) {sorted(used - declared)}; "
                f"allowed: {sorted(declared)}"
            )
        if declared - used:
            raise PromptTemplateError(
                f"prompt template is missing placeholder(s) {sorted(declared - used)} that the agent fills in"
            )
        return self

    def format(self, **values: Any) -> str:
        missing = set(self.placeholders) - values.keys()
        if missing:
            raise PromptTemplateError(f"no value given for placeholder(s) {sorted(missing)}")
        return self.template.format(**{k: values[k] for k in self.placeholders})


class Resources(_Record):
    """What an algorithm lends the agent for one rollout; a new version is published after every update."""

    version: int = 0
    llm: LLMResource
    prompts: dict[str, PromptTemplate] = Field(default_factory=dict)

    def for_rollout(self, gateway_url: str, rollout_id: str, attempt_no: int | None = None) -> Resources:
        """A copy whose base URL attributes every call to ``rollout_id`` (no agent code change needed); with
        ``attempt_no``, only while that attempt runs (a late call from an ended attempt is refused, never
        recorded in the retry that replaced it)."""
        path = f"rollouts/{rollout_id}" if attempt_no is None else f"rollouts/{rollout_id}/attempts/{attempt_no}"
        llm = self.llm.model_copy(update={"base_url": f"{gateway_url.rstrip('/')}/{path}/v1"})
        return self.model_copy(update={"llm": llm})


class Trajectory(_Record):
    """One token-level training row built from a rollout's llm spans.

    ``env_mask`` has one entry per completion token: 1 where the policy sampled it, 0 for tool results,
    template and other tokens that were put in the sequence by the environment. ``logprobs`` holds the
    sampling logprob for policy tokens and 0.0 for the others.
    """

    rollout_id: str
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    env_mask: list[int]
    reward: float
    group_id: str
    policy_version: int
    task_id: str = ""

    @model_validator(mode="after")
    def _aligned(self) -> Trajectory:
        n = len(self.completion_ids)
        if len(self.logprobs) != n or len(self.env_mask) != n:
            raise ValueError(
                f"trajectory {self.rollout_id}: completion_ids ({n}), logprobs ({len(self.logprobs)}) and "
                f"env_mask ({len(self.env_mask)}) must have the same length"
            )
        return self

"""The Engine protocol: token ids in, token ids and logprobs out.

The gateway owns chat templating and tokenisation (design decision 1); an engine only ever sees token ids.
Implementations: :mod:`rltrain.engines.transformers` (embedded, dynamic batching) and
:mod:`rltrain.engines.vllm` (a ``vllm serve`` process, GPU), several of which
:mod:`rltrain.engines.engine_pool` puts behind one gateway.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

#: ``on_token(completion_index, token_id, logprob)``: called on the caller's event loop for each token as it is
#: sampled, by engines whose ``streams_tokens`` is true (see :func:`generate`)
OnToken = Callable[[int, int, float], None]


class EngineError(RuntimeError):
    """The engine cannot serve a request (overloaded, dead process, prompt longer than the context)."""


class ContextLengthError(EngineError, ValueError):
    """The prompt plus ``max_tokens`` does not fit the model's context window."""


@dataclass(frozen=True)
class GenerationRequest:
    """One sampling request. ``n`` completions are sampled independently from the same prompt.

    ``adapter`` names the policy version to sample with (``None`` = the engine's current one). ``seed`` makes
    sampling reproducible per request; with ``temperature == 0`` decoding is greedy. ``session`` names the
    conversation (the rollout) a request continues: several engines behind one gateway serve a session's requests
    on one engine, whose prefix cache holds its earlier turns; one engine ignores it.
    """

    prompt_ids: list[int]
    max_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    adapter: str | None = None
    session: str | None = None


@dataclass
class Completion:
    """One sampled completion: ids exactly as sampled (stop token included when it ended on one)."""

    completion_ids: list[int]
    logprobs: list[float]
    finish_reason: Literal["stop", "length"]


@dataclass
class GenerationResult:
    completions: list[Completion]
    policy_version: int = 0
    model: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Engine(Protocol):
    """What the gateway needs from an engine."""

    #: the name clients use in ``model=`` (and that ``/v1/models`` lists)
    model_name: str
    #: the Hugging Face tokenizer matching the engine's vocabulary (the gateway templates with it)
    tokenizer: Any
    #: the largest prompt + completion length the engine accepts
    max_context: int

    @property
    def policy_version(self) -> int:
        """Version of the weights currently used for sampling (bumped on every weight sync)."""

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """Sample ``request.n`` completions. Raises :class:`ContextLengthError` / :class:`EngineError`.

        Cancelling the awaiting task (the client went away) must stop the engine's work on the request."""

    def close(self) -> None:
        """Stop worker threads / processes."""


async def generate(engine: Engine, request: GenerationRequest, on_token: OnToken | None = None) -> GenerationResult:
    """``engine.generate(request)``, reporting each token to ``on_token`` as it is sampled when the engine can
    (``streams_tokens = True`` and a ``generate(request, on_token=...)``); other engines report nothing and the
    caller gets every token with the result."""
    if on_token is not None and getattr(engine, "streams_tokens", False):
        return await engine.generate(request, on_token=on_token)  # type: ignore[call-arg]
    return await engine.generate(request)

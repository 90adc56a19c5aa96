"""Several vLLM servers behind one gateway (data parallelism): :class:`EnginePool`.

The pool is an :class:`~rltrain.engines.base.Engine` with :class:`~rltrain.engines.vllm.VLLMEngine`'s adapter
methods, so the gateway and the weight sync use one engine or several alike. Its rules:

* **Affinity.** A request names its rollout (``GenerationRequest.session``, set by the gateway); every request of a
  rollout goes to the engine that served its first one, whose prefix cache holds the rollout's earlier turns.
* **Spread by load.** A rollout's first request (and a request with no session) goes to the live engine with the
  fewest requests in flight; ties go to the one that served fewer so far.
* **Weight sync reaches every engine.** ``load_adapter`` / ``unload_adapter`` run on every live engine at once and
  return when all are done; ``set_policy_version`` switches all of them. So when the trainer's sync returns, the
  next step samples the new version wherever its rollouts land.
* **A dead engine leaves the rotation.** When a request or an adapter call fails and the engine's ``/health`` then
  fails too (connection refused, vLLM's 503 after an ``EngineDeadError``), the engine is taken out for the rest of
  the run with one WARNING naming its URL and the reason, and stopped if rltrain started it (a server rltrain
  started is first restarted by :class:`VLLMEngine` itself, ``engine.vllm.max_restarts`` times). Its rollouts move
  to the others on their next request. The failed request is sent to another engine, unless it was streamed and
  tokens already went out (a retry would not reproduce them): then it fails. A request that fails while its engine
  stays healthy fails as it would on one engine. With no engine left, every call raises
  :class:`NoEngineLeftError` naming each engine's reason; a training run then stops on its step's failed rollouts
  or on the next weight sync.

Requests per engine are counted (:attr:`EnginePool.requests_per_engine`) and logged when the pool closes.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rltrain.engines.base import EngineError, GenerationRequest, GenerationResult, OnToken
from rltrain.engines.vllm import VLLMEngine

if TYPE_CHECKING:
    from rltrain.recipes import Recipe

logger = logging.getLogger(__name__)

#: rollouts whose engine the pool remembers; the oldest is forgotten first (a finished rollout sends no more
#: requests, and a forgotten live one only loses its prefix cache), far above any runner's concurrency
MAX_SESSIONS = 4096


class NoEngineLeftError(EngineError):
    """Every engine of the pool was taken out of rotation."""


@dataclass
class _Member:
    engine: VLLMEngine
    in_flight: int = 0
    served: int = 0
    #: why it was taken out of rotation; None while it serves
    dead: str | None = None

    @property
    def url(self) -> str:
        return self.engine.base_url


class EnginePool:
    """One :class:`~rltrain.engines.base.Engine` over several :class:`VLLMEngine` serving the same model."""

    #: ``generate`` takes ``on_token`` (see :func:`rltrain.engines.base.generate`)
    streams_tokens = True

    def __init__(self, engines: list[VLLMEngine]) -> None:
        if not engines:
            raise ValueError("an engine pool needs at least one engine")
        first = engines[0]
        self.model_name = first.model_name
        self.tokenizer = first.tokenizer
        self.adapters_enabled = first.adapters_enabled
        #: the shortest context of the engines, so that a request fits wherever it lands
        self.max_context = min(engine.max_context for engine in engines)
        self._members = [_Member(engine) for engine in engines]
        self._sessions: OrderedDict[str, _Member] = OrderedDict()
        self._lock = threading.Lock()

    # -- which engine -----------------------------------------------------------------------------------------
    def _alive(self) -> list[_Member]:
        with self._lock:
            return [member for member in self._members if member.dead is None]

    def _live(self) -> list[_Member]:
        """The engines in rotation; :class:`NoEngineLeftError` when there are none."""
        live = self._alive()
        if not live:
            raise NoEngineLeftError(
                "every vLLM engine was taken out of rotation: "
                + "; ".join(f"{member.url}: {member.dead}" for member in self._members)
            )
        return live

    def _pick(self, session: str | None) -> _Member:
        """The session's engine while it lives, else the least loaded live one (remembered for the session)."""
        live = self._live()
        with self._lock:
            member = self._sessions.get(session) if session is not None else None
            if member is None or member.dead is not None:
                member = min(live, key=lambda m: (m.in_flight, m.served))
                if session is not None:
                    self._sessions[session] = member
                    while len(self._sessions) > MAX_SESSIONS:
                        self._sessions.popitem(last=False)
            elif session is not None:
                self._sessions.move_to_end(session)
            member.in_flight += 1
        return member

    def _retire(self, member: _Member, reason: str) -> None:
        """Take ``member`` out of rotation (once), its sessions go to the others on their next request."""
        with self._lock:
            if member.dead is not None:
                return
            member.dead = reason
            moved = [session for session, owner in self._sessions.items() if owner is member]
            for session in moved:
                del self._sessions[session]
            left = sum(m.dead is None for m in self._members)
        logger.warning("vLLM engine %s is out of rotation: %s; %d rollout(s) move to the %d engine(s) left",
                       member.url, reason, len(moved), left)
        if member.engine.server is not None:  # rltrain started it: stop what is left (its GPU memory, its workers)
            member.engine.server.stop()

    def _is_dead(self, member: _Member, error: EngineError) -> bool:
        """Whether ``error`` came from a dead engine (its /health fails too); if so it is retired."""
        if member.dead is not None:  # retired while this call was in flight
            return True
        if isinstance(error, ValueError):  # the request's own fault (4xx, context length): the engine answered
            return False
        problem = member.engine.health_problem()
        if problem is None:
            return False
        self._retire(member, f"{error} ({problem})")
        return True

    # -- generation -------------------------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest, on_token: OnToken | None = None) -> GenerationResult:
        """Sample on the request's session's engine (or the least loaded one); a dead engine's request goes to
        another one unless tokens of it were already streamed."""
        while True:
            member = self._pick(request.session)
            reported = 0

            def counted(index: int, token: int, logprob: float) -> None:
                nonlocal reported
                reported += 1
                on_token(index, token, logprob)  # type: ignore[misc]

            try:
                result = await member.engine.generate(request, on_token=counted if on_token is not None else None)
            except EngineError as exc:
                if not await asyncio.to_thread(self._is_dead, member, exc):
                    raise
                if reported:
                    raise EngineError(
                        f"{exc}; {reported} token(s) of this streamed request were already sent on, so it is not "
                        "retried on another engine"
                    ) from exc
                continue  # another engine serves it
            finally:
                with self._lock:
                    member.in_flight -= 1
            with self._lock:
                member.served += 1
            return result

    # -- policy versions: every live engine -------------------------------------------------------------------
    @property
    def policy_version(self) -> int:
        return self._reference().policy_version

    @property
    def loaded_versions(self) -> list[int]:
        return self._reference().loaded_versions

    def _reference(self) -> VLLMEngine:
        """An engine whose versions are the pool's (every live one has the same; with none left, the first)."""
        return (self._alive() or self._members)[0].engine

    def set_policy_version(self, version: int) -> None:
        for member in self._live():
            member.engine.set_policy_version(version)

    def load_adapter(self, version: int, path: Path) -> None:
        """Hot-load ``policy-v{version}`` on every live engine; returns once all have it."""
        self._on_every_engine(lambda engine: engine.load_adapter(version, path))

    def unload_adapter(self, version: int) -> None:
        self._on_every_engine(lambda engine: engine.unload_adapter(version))

    def adopt_adapter(self, version: int, path: Path) -> None:
        for member in self._live():
            member.engine.adopt_adapter(version, path)

    def forget_adapter(self, version: int) -> None:
        for member in self._live():
            member.engine.forget_adapter(version)

    def _on_every_engine(self, call: Callable[[VLLMEngine], None]) -> None:
        """``call`` on every live engine at once; a dead engine is retired, any other error raised (after all
        calls ended); with no engine left, :class:`NoEngineLeftError`."""
        live = self._live()
        with ThreadPoolExecutor(max_workers=len(live)) as pool:
            futures = [(member, pool.submit(call, member.engine)) for member in live]
        errors = []
        for member, future in futures:
            error = future.exception()
            if isinstance(error, EngineError) and self._is_dead(member, error):
                continue
            if error is not None:
                errors.append(error)
        if errors:
            raise errors[0]
        self._live()

    # -- bookkeeping ------------------------------------------------------------------------------------------
    @property
    def requests_per_engine(self) -> dict[str, int]:
        """Requests each engine served, by URL (a retired engine keeps its count)."""
        with self._lock:
            return {member.url: member.served for member in self._members}

    @property
    def engines(self) -> list[VLLMEngine]:
        """The engines still in rotation."""
        return [member.engine for member in self._live()]

    def close(self) -> None:
        """Close every engine (stopping the servers rltrain started)."""
        logger.info("requests served per vLLM engine: %s", self.requests_per_engine)
        for member in self._members:
            member.engine.close()


def vllm_engine(recipe: Recipe, tokenizer: Any = None) -> VLLMEngine | EnginePool:
    """The recipe's vLLM engine: one :class:`VLLMEngine`, or an :class:`EnginePool` over ``engine.vllm.urls`` or
    ``engine.vllm.replicas`` started servers (started side by side; if one fails, the others are stopped)."""
    count = recipe.engine.vllm.engine_count
    if count == 1:
        return VLLMEngine.from_recipe(recipe, tokenizer)
    if tokenizer is None:
        from transformers import AutoTokenizer

        from rltrain.models import ensure_pad_token, resolve_model

        tokenizer = AutoTokenizer.from_pretrained(resolve_model(recipe.model.name))
        ensure_pad_token(tokenizer)
    with ThreadPoolExecutor(max_workers=count) as pool:
        futures = [pool.submit(VLLMEngine.from_recipe, recipe, tokenizer, replica) for replica in range(count)]
    engines = [future.result() for future in futures if future.exception() is None]
    failed = next((future.exception() for future in futures if future.exception() is not None), None)
    if failed is not None:
        for engine in engines:
            engine.close()
        raise failed
    logger.info("%d vLLM engines behind the gateway: %s", count, ", ".join(e.base_url for e in engines))
    return EnginePool(engines)

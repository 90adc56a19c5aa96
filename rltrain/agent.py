"""The agent API: ``@rollout``, ``emit_reward``, ``emit_answer``, tool spans and ``reply_with``.

An agent is the user's own function, ``(task, resources) -> reward``, sync or async, unchanged except for the
decorator. While the runner executes it, a :class:`RolloutContext` (a ``contextvars`` variable, so it follows
threads started through ``asyncio.to_thread`` and tasks) tells ``emit_reward`` and ``tool_span`` where to
record. Outside a rollout both are harmless no-ops, so the same agent runs in a notebook without rltrain.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
import os
import queue
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from rltrain.store.base import Store
from rltrain.types import PromptTemplate, Resources, Span, SpanKind

logger = logging.getLogger(__name__)

AgentFn = Callable[[dict[str, Any], Resources], "float | None | Awaitable[float | None]"]


@dataclass
class RolloutContext:
    """Where the spans of the running attempt go. Made by the runner, one per attempt."""

    rollout_id: str
    attempt_no: int
    store: Store
    rewards: list[float] = field(default_factory=list)
    #: set by the runner when the attempt ended (timed out, say) while the agent's thread still runs
    closed: bool = False

    def record(self, kind: SpanKind, name: str, start: float, attributes: dict[str, Any]) -> Span | None:
        """Store one span; after the attempt ended nothing more is written (a hung agent that wakes up
        late must not add spans to a finished rollout)."""
        if self.closed:
            logger.warning("rollout %s attempt %d already ended: %s span %r dropped",
                           self.rollout_id, self.attempt_no, kind, name)
            return None
        span = Span(
            rollout_id=self.rollout_id,
            attempt_no=self.attempt_no,
            kind=kind,
            name=name,
            start_time=start,
            end_time=time.time(),
            attributes=attributes,
        )
        return self.store.add_spans([span])[0]


_current: contextvars.ContextVar[RolloutContext | None] = contextvars.ContextVar("rltrain_rollout", default=None)


def current_context() -> RolloutContext | None:
    """The context of the rollout running in this thread/task, or ``None`` outside the runner."""
    return _current.get()


@contextmanager
def rollout_context(ctx: RolloutContext) -> Iterator[RolloutContext]:
    """Make ``ctx`` current for the code inside (the runner wraps each attempt in this)."""
    token = _current.set(ctx)
    try:
        yield ctx
    finally:
        _current.reset(token)


def emit_reward(value: float, name: str = "reward") -> None:
    """Record a reward span for the running rollout. The agent's return value, when not ``None``, is the
    rollout's final reward; otherwise the last emitted reward is."""
    ctx = current_context()
    if ctx is None:
        logger.debug("emit_reward(%s) outside a rollout: ignored", value)
        return
    ctx.rewards.append(float(value))
    ctx.record(SpanKind.REWARD, name, time.time(), {"value": float(value)})


#: the name of the span :func:`emit_answer` records (a ``log`` span with the answer as ``value``)
ANSWER_SPAN = "answer"


def emit_answer(answer: str | None) -> None:
    """Record the answer the rollout gave (``"Nova"``, ``"42"``), for the answer-distribution diagnostics:
    ``evaluate`` reports how often each answer was given and GRPO warns when the policy collapses onto one.

    Call it once, with the answer as the agent read it from the model (``None`` when it could read none); the
    last call of a rollout counts. Outside a rollout it does nothing.
    """
    ctx = current_context()
    if ctx is None:
        return
    ctx.record(SpanKind.LOG, ANSWER_SPAN, time.time(), {"value": None if answer is None else str(answer)})


def answer_of(spans: list[Span]) -> str | None:
    """The answer a rollout reported with :func:`emit_answer` (its last), or ``None``."""
    for span in reversed(spans):
        if span.kind is SpanKind.LOG and span.name == ANSWER_SPAN:
            value = span.attributes.get("value")
            return None if value is None else str(value)
    return None


def reply_with(
    resources: Resources, messages: list[dict[str, Any]], reply: str, tools: list[dict[str, Any]] | None = None
) -> Any:
    """Send ``messages`` through rltrain's gateway with ``reply`` as the assistant's answer instead of a sampled
    one, and return the ``ChatCompletion`` (its message parsed like a sampled one: tool calls included).

    This is how a warm-start teacher demonstrates: the gateway tokenises ``reply`` as if the local model had
    written it and records it, so the warm start trains on exactly those tokens. The reply can come from
    anywhere: a solver, a rule, or a stronger model's OpenAI endpoint (call it with your own client, then pass
    its text here). Send the same ``messages`` and ``tools`` your agent sends, so the student learns to answer
    the requests it will really see.
    """
    from openai import OpenAI

    with OpenAI(base_url=resources.llm.base_url, api_key=resources.llm.api_key) as client:
        return client.chat.completions.create(
            model=resources.llm.model,
            messages=messages,  # type: ignore[arg-type]
            **({"tools": tools} if tools else {}),  # type: ignore[arg-type]
            extra_body={"rltrain_completion": reply},
        )


@dataclass
class ToolCallHandle:
    """Yielded by :func:`tool_span`; set ``result`` to have it recorded."""

    name: str
    arguments: dict[str, Any]
    result: Any = None


@contextmanager
def tool_span(name: str, arguments: dict[str, Any] | None = None) -> Iterator[ToolCallHandle]:
    """Record one tool call (name, arguments, result or error, duration) as a span.

    An exception inside the block is recorded as the span's ``error`` and re-raised: the agent decides what a
    failing tool means for its reward.
    """
    handle = ToolCallHandle(name=name, arguments=dict(arguments or {}))
    start = time.time()
    error: str | None = None
    try:
        yield handle
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        ctx = current_context()
        if ctx is not None:
            ctx.record(
                SpanKind.TOOL,
                name,
                start,
                {"arguments": handle.arguments, "result": _jsonable(handle.result), "error": error},
            )


def tool(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: every call of ``fn`` is recorded as a tool span with its keyword arguments and result."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        bound = inspect.signature(fn).bind(*args, **kwargs)
        with tool_span(fn.__name__, dict(bound.arguments)) as call:
            call.result = fn(*args, **kwargs)
            return call.result

    return wrapper


def _jsonable(value: Any) -> Any:
    """Tool results are stored as JSON; anything that is not JSON-native is kept as its ``repr``."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)


#: parameter names an agent may ask for instead of the whole ``resources`` (Agent Lightning's spelling)
_LLM_PARAM, _PROMPT_PARAM = "llm", "prompt_template"


def _resource_getters(fn: Callable[..., Any]) -> list[Callable[[Resources], Any]]:
    """What to pass after the task: ``(task, resources)`` gets the resources; an agent written for Agent
    Lightning, ``(task, prompt_template)`` or ``(task, llm, prompt_template)``, gets them by parameter name:
    ``llm`` the LLM resource, ``prompt_template`` the prompt of that name or else the only one, ``resources``
    all of them, any other name the prompt of that name."""
    params = list(inspect.signature(fn).parameters.values())[1:]
    positional = [p for p in params if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    names = [p.name for p in positional if p.default is inspect.Parameter.empty
             and p.kind is not inspect.Parameter.VAR_POSITIONAL]
    if (len(names) == 1 and names[0] not in (_LLM_PARAM, _PROMPT_PARAM)) or (not names and positional):
        return [lambda r: r]
    getters: list[Callable[[Resources], Any]] = []
    for name in names:
        if name == "resources":
            getters.append(lambda r: r)
        elif name == _LLM_PARAM:
            getters.append(lambda r: r.llm)
        else:
            getters.append(functools.partial(_prompt_named, name))
    return getters


def _prompt_named(name: str, resources: Resources) -> PromptTemplate:
    prompts = resources.prompts
    if name in prompts:
        return prompts[name]
    if name == _PROMPT_PARAM and len(prompts) == 1:
        return next(iter(prompts.values()))
    raise KeyError(f"the agent asks for prompt {name!r}, but the resources hold {sorted(prompts)}; name it in "
                   "initial_resources (or the recipe's `prompts:`)")


class Agent:
    """A decorated agent function. Call :meth:`run` to execute it inside a rollout context."""

    def __init__(self, fn: AgentFn, name: str | None = None, needs_llm: bool = True) -> None:
        self.fn = fn
        self.name = name or fn.__name__
        #: False for agents that never call a model (a solver): no engine is started for them
        self.needs_llm = needs_llm
        self.is_async = inspect.iscoroutinefunction(fn)
        self._getters = _resource_getters(fn)
        functools.update_wrapper(self, fn)

    def _arguments(self, task: dict[str, Any], resources: Resources) -> tuple[Any, ...]:
        return (task, *(get(resources) for get in self._getters))

    def __call__(self, task: dict[str, Any], resources: Resources) -> Any:
        return self.fn(*self._arguments(task, resources))

    async def run(self, task: dict[str, Any], resources: Resources, ctx: RolloutContext) -> float | None:
        """Execute once under ``ctx``; sync agents run in a daemon worker thread so they never block the loop.

        Returns the agent's raw result (its return value, else its last emitted reward, else ``None``); the
        runner validates it.
        """
        with rollout_context(ctx):
            if self.is_async:
                value = await self.fn(*self._arguments(task, resources))  # type: ignore[misc]
            else:
                value = await _in_daemon_thread(self.fn, *self._arguments(task, resources))
        if value is None and ctx.rewards:
            return ctx.rewards[-1]
        return value  # type: ignore[return-value]


_Deliver = Callable[[Any, "BaseException | None"], None]


class _DaemonWorkers:
    """Reusable daemon threads for sync agents; starting a thread per attempt costs about 0.4 ms.

    Not a ``ThreadPoolExecutor``: a hung agent cannot be killed, and an executor would both cap concurrency at
    its size and block interpreter exit on the hung thread. Here a job goes to an idle thread when there is
    one and to a new thread otherwise, so concurrency is never capped; a thread stuck in a hung agent is never
    idle again and so is simply abandoned; all threads are daemons and die with the process.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], _Deliver]] = queue.SimpleQueue()
        self._idle = 0  # threads waiting for a job that no queued job is promised to yet

    def submit(self, call: Callable[[], Any], deliver: _Deliver) -> None:
        """Run ``call`` in a worker thread, then hand its result or exception to ``deliver`` there."""
        with self._lock:
            spawn = self._idle == 0
            if not spawn:
                self._idle -= 1
        self._jobs.put((call, deliver))
        if spawn:
            threading.Thread(target=self._work, daemon=True, name="rltrain-agent").start()

    def _work(self) -> None:
        while True:
            call, deliver = self._jobs.get()
            result: Any = None
            error: BaseException | None = None
            try:
                result = call()
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine as is
                error = exc
            # Idle before delivering: the caller's next submit, woken by this delivery, then finds this thread.
            with self._lock:
                self._idle += 1
            try:
                deliver(result, error)
            except Exception:  # this thread is promised to the next job: it must keep serving
                logger.exception("delivering a sync agent's result failed")
            del call, deliver, result, error  # an idle thread keeps nothing of its last rollout alive


_workers = _DaemonWorkers()


def _forget_workers() -> None:
    """In a forked child the parent's threads (and perhaps a held lock) do not exist: start from none."""
    global _workers
    _workers = _DaemonWorkers()


os.register_at_fork(after_in_child=_forget_workers)


def _in_daemon_thread(fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
    """Run a sync agent in a reusable daemon thread (:class:`_DaemonWorkers`) carrying the current contextvars.

    On timeout the awaiting coroutine stops waiting; the thread finishes (or hangs) on its own.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()
    context = contextvars.copy_context()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():  # cancelled by a timeout: nobody is waiting any more
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def deliver(result: Any, error: BaseException | None) -> None:
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop is closed: the run ended while this agent hung
            logger.debug("agent thread finished after its event loop closed; result dropped")

    _workers.submit(lambda: context.run(fn, *args), deliver)
    return future


def rollout(fn: AgentFn | None = None, *, name: str | None = None, needs_llm: bool = True) -> Any:
    """Mark a function ``(task, resources) -> float | None`` as an rltrain agent (sync or async).

    ``needs_llm=False`` declares an agent that never calls the model (a solver, a scripted teacher), so
    evaluation starts no engine for it.
    """
    if fn is None:
        return lambda f: Agent(f, name=name, needs_llm=needs_llm)
    return Agent(fn, name=name, needs_llm=needs_llm)


def format_exception(exc: BaseException) -> dict[str, Any]:
    """The attributes of an exception span: type, message and the full traceback."""
    return {
        "type": type(exc).__name__,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(exc)),
    }


class AgentImportError(ValueError):
    """A ``module:attribute`` agent reference that does not name an importable ``@rollout`` function."""


#: agents handed to the Python API, by the reference a recipe records for them
_REGISTERED: dict[str, Agent] = {}


def register_agent(fn: Callable[..., Any]) -> str:
    """Remember ``fn`` (a ``@rollout`` function, or a plain one, which is wrapped) and return the
    ``module:qualname`` reference a recipe records for it; :func:`resolve_agent` finds it by that name even when
    it is not importable (defined in ``__main__``, a notebook or a test)."""
    agent = fn if isinstance(fn, Agent) else Agent(fn)
    ref = f"{agent.fn.__module__}:{agent.fn.__qualname__}"
    _REGISTERED[ref] = agent
    return ref


def resolve_agent(ref: str) -> Agent:
    """The agent a ``module:attribute`` reference names (registered, or imported)."""
    if ref in _REGISTERED:
        return _REGISTERED[ref]
    module_name, sep, attribute = ref.partition(":")
    if not sep or not module_name or not attribute:
        raise AgentImportError(f"agent {ref!r}: name it as module:attribute, e.g. my_agents:room_selector")
    import importlib

    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise AgentImportError(f"agent {ref!r}: cannot import it ({exc}); its module must be importable "
                               "(on PYTHONPATH, or next to the recipe)") from None
    if not callable(target):
        raise AgentImportError(f"agent {ref!r} is a {type(target).__name__}, not a @rollout function")
    return target if isinstance(target, Agent) else Agent(target)

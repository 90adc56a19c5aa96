"""The embedded engine: a Hugging Face causal LM in this process, with dynamic batching.

Why a hand-written decode loop instead of ``model.generate``: every request in a batch keeps its own
temperature, top-p, top-k, seed, ``max_tokens`` and stop tokens, rows leave the batch as soon as they finish,
and the logprob of every sampled token comes out exactly, which ``generate`` does not give per row.

How a request is served (continuous batching):

1. :meth:`TransformersEngine.generate` validates it (a bad request fails alone, before it can share a batch)
   and puts it on a queue.
2. One worker thread runs a batch of at most ``max_batch_size`` rows (a request with ``n`` completions is ``n``
   rows). An idle worker takes the first queued request and whatever else arrives within ``batch_window_ms``;
   a busy one, between two decode steps, lets queued rows join the running batch once at least half of its
   rows are free. An agent's next chat call thus joins while its earlier batch mates still decode, instead of
   waiting for the longest row of a batch; joining in groups rather than one row at a time keeps the prefills
   (which stall the batch) few and large (``benchmarks/bench_engine_batching.py``: joining at every free row was
   0.9x of one batch at a time, at half the rows faster).
3. Joining rows are prefilled together: left-padded with an attention mask and explicit position ids, so a
   padded row computes exactly what it would alone; identical prompts (the ``n`` rows of one request, say) are
   prefilled once and their KV cache rows duplicated. A prefix that every distinct prompt starts with (an
   agent's system prompt and tool schema: ~450 of the ~530 tokens of a tool-mode room request) is computed once
   and its KV cache shared, and kept while the batch runs, so rows that join later start from it too. On a
   CPU, where the prompt pass is most of a prefill's time, that is the difference between re-reading the
   system prompt for every request and reading it once. The joining rows' cache is then right-aligned with the
   running rows' in buffers that have room for every row's remaining tokens: a decode step writes its token in
   place (``torch.cat`` growth copied the whole cache every step). Finished rows leave the batch at once, and a
   request is answered as soon as its own rows finish.
4. Each sampled token goes to the request's ``on_token`` callback as soon as it is sampled (streaming), and results
   go back to each caller's event loop, both with ``call_soon_threadsafe``. A caller that gives up (its task is
   cancelled: the HTTP client went away) marks its request cancelled; its rows leave the batch at the next
   decode step, so abandoned work stops within one token. An exception fails the requests of the rows it hit
   only (a prefill: the joining rows'; a decode step: the running batch's), as :class:`EngineError`; the worker
   goes on with the next batch.
5. Should the worker thread itself die (an error outside a batch's decode, a ``BaseException``), the engine
   stops: every queued request and every later ``generate`` fails at once with :class:`EngineError` naming
   the reason (:attr:`TransformersEngine.failure`), instead of waiting forever for a thread that is gone.

Logprobs: the logprob of a sampled token is ``log_softmax(logits / temperature)`` at that token, over the full
vocabulary (before top-k / top-p filtering); with ``temperature == 0`` (greedy) it is the raw
``log_softmax(logits)``. That is what TRL's ``GRPOTrainer`` recomputes with its own ``temperature`` when it
trains on these samples, so the importance ratios start at 1 when the weights have not moved.

Weights: the engine can share the trainer's model object (PEFT-wrapped or not), so it always samples with the
current weights. The worker holds :attr:`TransformersEngine.weights_lock` while a batch runs, from its first row
until it empties (and switches the model to eval mode for it, restoring the previous mode after), so every row
of a batch, joiners included, samples with one set of weights; whoever changes the weights holds the same lock
around the change and bumps the version with :meth:`TransformersEngine.set_policy_version`. The request's
``adapter`` field is therefore not used for selection: every result says which ``policy_version`` produced it.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from rltrain.engines.base import (
    Completion,
    ContextLengthError,
    EngineError,
    GenerationRequest,
    GenerationResult,
    OnToken,
)
from rltrain.models import DEFAULT_MODEL, ensure_pad_token, load_model_and_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

#: odd 64-bit constant (golden ratio) that spreads the seeds of the ``n`` rows of one seeded request apart
_ROW_SEED_STRIDE = 0x9E3779B97F4A7C15


class InvalidRequestError(EngineError, ValueError):
    """A request field is out of range (empty prompt, unknown token id, negative temperature, ...)."""


#: the shortest common prompt prefix a batch computes once and shares (below it the extra pass costs more than
#: it saves)
SHARED_PREFIX_MIN_TOKENS = 16


@dataclass
class EngineStats:
    """Counters since the engine started, for metrics. ``engine.stats`` returns a snapshot copy."""

    #: requests accepted by ``generate``
    requests: int = 0
    #: completions sampled (sum of ``n`` over requests)
    rows: int = 0
    #: decode passes run (each over at most ``max_batch_size`` rows)
    batches: int = 0
    #: decode passes that raised (their requests got an EngineError)
    failed_batches: int = 0
    #: the most rows one decode pass held
    largest_batch: int = 0
    #: prompt tokens of accepted requests (counted once per request, not per row)
    prompt_tokens: int = 0
    #: tokens sampled, over all rows
    generated_tokens: int = 0
    #: rows dropped because their caller gave up (cancelled) before they finished
    cancelled_rows: int = 0
    #: prompt tokens not computed again because a batch's prompts shared them (see ``_prefill``)
    shared_prefix_tokens: int = 0


@dataclass
class _Pending:
    """A queued request and where its result goes."""

    request: GenerationRequest
    future: asyncio.Future[GenerationResult]
    loop: asyncio.AbstractEventLoop
    on_token: OnToken | None = None
    #: set (on the caller's loop) when the caller stopped waiting; read by the worker between decode steps
    cancelled: bool = False
    #: the request's ``n`` rows (made when the worker accepts it) and how many of them joined the running batch
    rows: list[_Row] = field(default_factory=list)
    admitted: int = 0
    #: rows not finished yet; the request is answered when it reaches 0
    unfinished: int = 0

    def cancel_when_abandoned(self) -> None:
        def mark(future: asyncio.Future[GenerationResult]) -> None:
            if future.cancelled():
                self.cancelled = True

        self.future.add_done_callback(mark)

    def report(self, index: int, token: int, logprob: float) -> None:
        """Hand one sampled token to ``on_token`` on the caller's loop (a closed loop: the caller is gone)."""
        if self.on_token is None or self.cancelled:
            return
        try:
            self.loop.call_soon_threadsafe(self.on_token, index, token, logprob)
        except RuntimeError:
            self.cancelled = True


@dataclass
class _Row:
    """One completion being sampled: the request's settings plus its own RNG and output so far."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    stop_ids: frozenset[int]
    generator: torch.Generator
    #: the request this row belongs to and its index among the request's ``n`` completions
    owner: _Pending | None = None
    index: int = 0
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: Literal["stop", "length"] | None = None

    def completion(self) -> Completion:
        assert self.finish_reason is not None, "a row is only read back once it finished"
        return Completion(completion_ids=self.ids, logprobs=self.logprobs, finish_reason=self.finish_reason)


_STOP = object()


class TransformersEngine:
    """An :class:`~rltrain.engines.base.Engine` over a model object in this process.

    ``model`` and ``tokenizer`` may be the trainer's own objects (sampling then uses its current weights).
    ``max_batch_size`` caps the rows decoded together; ``batch_window_ms`` is how long the worker waits for
    more requests after the first one arrives (latency traded for throughput). ``num_threads``, when given,
    calls ``torch.set_num_threads`` (process-wide) so callers on small machines can avoid oversubscription.
    The tokenizer gets a pad token if it has none (see :func:`rltrain.models.ensure_pad_token`).
    """

    #: ``generate`` takes ``on_token`` (see :func:`rltrain.engines.base.generate`)
    streams_tokens = True

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        model_name: str,
        max_batch_size: int = 8,
        batch_window_ms: float = 15.0,
        num_threads: int | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if batch_window_ms < 0:
            raise ValueError(f"batch_window_ms must be >= 0, got {batch_window_ms}")
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        ensure_pad_token(tokenizer)
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_context: int = int(model.config.max_position_embeddings)
        self.max_batch_size = max_batch_size
        self.batch_window_s = batch_window_ms / 1000.0
        #: held by the worker for a whole batch; hold it while changing the model's weights
        self.weights_lock = threading.RLock()
        self._vocab_size: int = model.get_input_embeddings().num_embeddings
        self._eos_ids = _eos_token_ids(model, tokenizer)
        self._pad_id: int = tokenizer.pad_token_id
        self._policy_version = 0
        self._stats = EngineStats()
        self._stats_lock = threading.Lock()
        self._queue: queue.Queue[Any] = queue.Queue()
        self._closed = False
        #: accepted requests not answered yet (running or waiting for room), which close() stops
        self._serving: list[_Pending] = []
        # worker-thread state: requests waiting for room in the batch, the batch, the prompt prefix it keeps
        self._waiting: collections.deque[_Pending] = collections.deque()
        self._running: _Running | None = None
        self._prefix: _CachedPrefix | None = None
        self._stopping = False
        self._holding_weights = False
        self._was_training = False
        #: why the worker thread died (``None`` while it runs); a dead engine refuses every request with it
        self.failure: str | None = None
        self._state_lock = threading.Lock()
        self._worker = threading.Thread(target=self._run, name=f"rltrain-engine-{model_name}", daemon=True)
        self._worker.start()

    @classmethod
    def from_pretrained(
        cls,
        name_or_dir: str = DEFAULT_MODEL,
        *,
        dtype: str = "float32",
        device: str = "cpu",
        max_batch_size: int = 8,
        batch_window_ms: float = 15.0,
        num_threads: int | None = None,
    ) -> TransformersEngine:
        """An engine that owns its model, loaded through :func:`rltrain.models.load_model_and_tokenizer`."""
        model, tokenizer = load_model_and_tokenizer(name_or_dir, dtype=dtype, device=device)
        return cls(
            model,
            tokenizer,
            model_name=str(name_or_dir),
            max_batch_size=max_batch_size,
            batch_window_ms=batch_window_ms,
            num_threads=num_threads,
        )

    @property
    def policy_version(self) -> int:
        return self._policy_version

    def set_policy_version(self, version: int) -> None:
        """Record that the weights changed (call it inside ``weights_lock``, right after the change)."""
        if version < 0:
            raise ValueError(f"policy version must be >= 0, got {version}")
        with self.weights_lock:
            self._policy_version = version

    @property
    def stats(self) -> EngineStats:
        with self._stats_lock:
            return dataclasses.replace(self._stats)

    async def generate(self, request: GenerationRequest, on_token: OnToken | None = None) -> GenerationResult:
        """Sample ``request``; ``on_token(index, token_id, logprob)`` is called for each token as it is sampled.
        Cancelling the awaiting task stops the request's rows at the next decode step."""
        self._validate(request)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[GenerationResult] = loop.create_future()
        pending = _Pending(request, future, loop, on_token)
        pending.cancel_when_abandoned()
        with self._state_lock:
            if self._closed:
                raise EngineError(self._refusal())
            self._queue.put(pending)
        with self._stats_lock:
            self._stats.requests += 1
            self._stats.rows += request.n
            self._stats.prompt_tokens += len(request.prompt_ids)
        return await future

    def close(self) -> None:
        """Stop the worker thread promptly: the batch being decoded stops at its next step, and it and every
        queued request fail with :class:`EngineError`; later ``generate`` calls fail too. Queued work is not
        served first: an engine closes when its run ends or is interrupted, when the gateway has already
        stopped and no caller is left to read a result (draining an evaluation's queue after Ctrl-C or SIGTERM
        took minutes on CPU)."""
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
            for pending in self._serving:
                pending.cancelled = True
            self._queue.put(_STOP)
        self._worker.join()

    def _refusal(self) -> str:
        """Why ``generate`` refuses: the engine was closed, or its worker died (and why)."""
        if self.failure is not None:
            return f"engine {self.model_name!r} stopped: its worker thread died ({self.failure})"
        return f"engine {self.model_name!r} is closed"

    def _validate(self, request: GenerationRequest) -> None:
        prompt = request.prompt_ids
        if not prompt:
            raise InvalidRequestError("prompt_ids is empty; the engine needs at least one token to continue")
        if not all(isinstance(token, int) for token in prompt):
            raise InvalidRequestError(f"prompt_ids must be a list of ints, got {prompt!r:.80}")
        if min(prompt) < 0 or max(prompt) >= self._vocab_size:
            raise InvalidRequestError(
                f"prompt_ids must lie in [0, {self._vocab_size}) for {self.model_name!r}, "
                f"got min {min(prompt)} and max {max(prompt)}"
            )
        checks = (
            ("max_tokens", request.max_tokens, request.max_tokens >= 1, ">= 1"),
            ("n", request.n, request.n >= 1, ">= 1"),
            ("temperature", request.temperature, request.temperature >= 0, ">= 0"),
            ("top_p", request.top_p, 0 < request.top_p <= 1, "in (0, 1]"),
            ("top_k", request.top_k, request.top_k >= 0, ">= 0 (0 = no limit)"),
        )
        for name, value, ok, expected in checks:
            if not ok:
                raise InvalidRequestError(f"{name} must be {expected}, got {value!r}")
        if len(prompt) + request.max_tokens > self.max_context:
            raise ContextLengthError(
                f"prompt of {len(prompt)} tokens + max_tokens {request.max_tokens} exceeds the context of "
                f"{self.max_context} tokens of {self.model_name!r}"
            )

    def _run(self) -> None:
        """Worker loop (continuous batching): between two decode steps, requests that arrived join the running
        batch as far as ``max_batch_size`` rows allow, and a request is answered as soon as its own rows finish.

        An agent's next turn can so join the batch while its earlier batch mates still decode, instead of waiting
        for the longest row of a batch to finish. Whatever escapes the loop is about to end this thread:
        :meth:`_die` first fails every request it holds and the queued ones and closes the engine, so no caller
        waits for a result that will never come."""
        try:
            while True:
                if self._running is None and not self._waiting:
                    if self._stopping:  # close() was called and the last batch has stopped
                        return
                    self._take(self._queue.get())  # idle: wait for work, then for batch mates
                    self._collect_window()
                else:
                    self._drain()
                if self._stopping:
                    for pending in list(self._waiting):
                        self._answer(pending, EngineError(self._refusal()))
                    self._waiting.clear()
                self._admit()
                if self._running is not None:
                    self._step()
        except BaseException as exc:  # noqa: BLE001 - logged and kept as the engine's failure; the thread ends
            self._die(exc)

    def _take(self, item: Any) -> None:
        """Accept one queue item: the stop marker, or a request whose rows then wait for room in the batch."""
        if item is _STOP:
            self._stopping = True
            return
        pending: _Pending = item
        pending.rows = _rows_of(pending, self._eos_ids)
        pending.unfinished = len(pending.rows)
        with self._state_lock:
            self._serving.append(pending)
            if self._closed:  # what was queued before close() fails: see close()
                pending.cancelled = True
        self._waiting.append(pending)

    def _waiting_rows(self) -> int:
        return sum(len(pending.rows) - pending.admitted for pending in self._waiting)

    def _collect_window(self) -> None:
        """Take what arrives within the batch window, until ``max_batch_size`` rows wait."""
        deadline = time.monotonic() + self.batch_window_s
        while self._waiting_rows() < self.max_batch_size and not self._stopping:
            try:
                self._take(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                return

    def _drain(self) -> None:
        """Take whatever is queued, without waiting: the batch is busy."""
        while True:
            try:
                self._take(self._queue.get_nowait())
            except queue.Empty:
                return

    def _admit(self) -> None:
        """Prefill waiting rows (as many as the batch has room for, in arrival order, once half of it is free)
        and join them to the batch.

        A failing prefill fails the requests of those rows only; the running batch goes on."""
        free = self.max_batch_size - (len(self._running.rows) if self._running is not None else 0)
        if self._running is not None and free < (self.max_batch_size + 1) // 2:
            return  # join in groups: each prefill stalls the running rows (see the module docstring)
        joining: list[_Row] = []
        while self._waiting and free > 0:
            pending = self._waiting[0]
            if pending.cancelled:  # its caller gave up (or close() stopped it) before it could join
                self._waiting.popleft()
                self._answer(pending, EngineError(self._refusal() if self._closed else "request cancelled"))
                continue
            count = min(free, len(pending.rows) - pending.admitted)
            joining.extend(pending.rows[pending.admitted : pending.admitted + count])
            pending.admitted += count
            free -= count
            if pending.admitted == len(pending.rows):
                self._waiting.popleft()
        if not joining:
            return
        starting = self._running is None
        if starting:
            self._begin_batch()
        try:
            with torch.no_grad():
                part = self._prefill(joining)
        except Exception as exc:  # noqa: BLE001 - logged by _fail; a prefill failure is the joining rows' only
            self._fail({id(row.owner): row.owner for row in joining if row.owner is not None}.values(), exc)
            if starting:
                self._end_batch()
            return
        running = self._running if self._running is not None else _Running(version=self._policy_version)
        running.join(joining, part)
        self._running = running
        with self._stats_lock:
            self._stats.largest_batch = max(self._stats.largest_batch, len(running.rows))

    def _begin_batch(self) -> None:
        """A batch starts: hold the weights (see the module docstring) and switch the model to eval mode."""
        self.weights_lock.acquire()
        self._holding_weights = True
        self._was_training = self.model.training
        self.model.eval()
        with self._stats_lock:
            self._stats.batches += 1

    def _end_batch(self) -> None:
        """The batch emptied (or failed): restore the model's mode, forget the prefix, let the weights change."""
        self._running = None
        self._prefix = None  # computed with these weights, which may change once the lock is released
        self.model.train(self._was_training)
        self._holding_weights = False
        self.weights_lock.release()

    def _step(self) -> None:
        """Sample one token for every row of the batch, answer the requests whose rows all finished, drop the
        finished rows and run the model one token further for the rest."""
        running = self._running
        assert running is not None
        try:
            tokens, logprobs = _sample(running.rows, running.logits)
            still: list[int] = []
            cancelled = 0
            answered: list[_Pending] = []
            for slot, (row, token, logprob) in enumerate(zip(running.rows, tokens.tolist(), logprobs, strict=True)):
                row.ids.append(token)
                row.logprobs.append(logprob)
                owner = row.owner
                if owner is not None:
                    owner.report(row.index, token, logprob)
                if owner is not None and owner.cancelled:
                    row.finish_reason = "length"  # never read back: its caller is gone
                    cancelled += 1
                elif token in row.stop_ids:
                    row.finish_reason = "stop"
                elif len(row.ids) >= row.max_tokens:
                    row.finish_reason = "length"
                else:
                    still.append(slot)
                    continue
                if owner is not None:
                    owner.unfinished -= 1
                    if owner.unfinished == 0:
                        answered.append(owner)
            with self._stats_lock:  # counted before the answers go out: a caller may read the stats at once
                self._stats.generated_tokens += len(running.rows)
                self._stats.cancelled_rows += cancelled
            if not still:  # before the answers: a caller may look at the model (its mode, weights) at once
                self._end_batch()
            for owner in answered:
                self._answer(owner, self._outcome(owner, running.version))
            if not still:
                return
            if len(still) < len(running.rows):
                running.keep(still)
                tokens = tokens[torch.tensor(still, device=tokens.device)]
            # no_grad rather than inference_mode: the model is shared with a trainer, and tensors created
            # lazily inside it under inference_mode could not be used in its backward pass later.
            with torch.no_grad():
                running.advance(self.model, tokens)
        except Exception as exc:  # noqa: BLE001 - logged by _fail; a failure is this batch's callers' only
            owners = {id(row.owner): row.owner for row in running.rows if row.owner is not None}
            self._fail(owners.values(), exc)
            if self._holding_weights:
                self._end_batch()

    def _outcome(self, pending: _Pending, version: int) -> GenerationResult | EngineError:
        """What a request whose rows all finished gets: its completions, or why it stopped early."""
        if pending.cancelled:  # its rows stopped early: the caller gave up, or close() stopped the batch
            return EngineError(self._refusal() if self._closed else "request cancelled")
        return GenerationResult(
            completions=[row.completion() for row in pending.rows], policy_version=version, model=self.model_name
        )

    def _fail(self, owners: Iterable[_Pending], exc: Exception) -> None:
        """A batch step or a prefill raised ``exc``: fail the requests it held (their other rows stop too)."""
        owners = list(owners)
        logger.exception("engine batch of %d requests failed", len(owners))
        with self._stats_lock:
            self._stats.failed_batches += 1
        for pending in owners:
            pending.cancelled = True
            error = EngineError(f"generation failed in a batch of {len(owners)} requests: {exc!r}")
            error.__cause__ = exc
            self._answer(pending, error)

    def _answer(self, pending: _Pending, outcome: GenerationResult | BaseException) -> None:
        with self._state_lock:
            if pending in self._serving:
                self._serving.remove(pending)
        _settle(pending, outcome)

    def _die(self, exc: BaseException) -> None:
        """The worker is dying of ``exc``: close the engine with the reason, fail every request it held or that
        is still queued, and let go of the weights."""
        logger.critical("engine %r worker thread died; the engine is stopped", self.model_name, exc_info=exc)
        with self._state_lock:
            self.failure = f"{type(exc).__name__}: {exc}"
            self._closed = True
            pending = list(self._serving)
            self._serving = []
        if self._holding_weights:
            self._end_batch()
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Pending):
                pending.append(item)
        for item in pending:
            error = EngineError(self._refusal())
            error.__cause__ = exc
            _settle(item, error)

    def _prefill(self, rows: list[_Row]) -> _Prefilled:
        """Run the distinct prompts once, their common prefix once (when it is at least
        :data:`SHARED_PREFIX_MIN_TOKENS` long, or taken from the prefix the running batch already computed);
        return the KV cache, last logits, attention mask and next position ids, expanded to one entry per row.

        Layout of the rows: ``[shared prefix][padding][the prompt's own tokens]``, the padding masked out and
        the position ids counting only real tokens, so every row computes what it would alone."""
        device = next(self.model.parameters()).device
        distinct: dict[tuple[int, ...], int] = {}
        row_prompt = [distinct.setdefault(tuple(row.prompt_ids), len(distinct)) for row in rows]
        prompts = list(distinct)
        shared = _shared_prefix_length(prompts)
        reused = self._prefix.usable_length(prompts) if self._prefix is not None else 0
        cache = None
        if reused and reused >= shared:
            assert self._prefix is not None
            shared = reused
            cache = self._prefix.expanded(shared, len(prompts))
            saved = shared * len(prompts)
        elif shared:
            out = self.model(input_ids=torch.tensor([prompts[0][:shared]], device=device), use_cache=True,
                             logits_to_keep=1)
            self._prefix = _CachedPrefix.of(prompts[0][:shared], out.cache)
            cache = self._prefix.expanded(shared, len(prompts))
            saved = shared * (len(prompts) - 1)
        if cache is not None:
            with self._stats_lock:
                self._stats.shared_prefix_tokens += saved
        width = max(len(prompt) for prompt in prompts) - shared
        input_ids = torch.full((len(prompts), width), self._pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), shared + width), dtype=torch.long)
        attention_mask[:, :shared] = 1
        for index, prompt in enumerate(prompts):
            own = prompt[shared:]
            input_ids[index, width - len(own) :] = torch.tensor(own)
            attention_mask[index, shared + width - len(own) :] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]
        logger.debug(
            "prefilling %d rows (%d distinct prompts, %d shared prefix tokens, the rest padded to %d tokens)",
            len(rows), len(prompts), shared, width,
        )
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        cache = out.cache
        logits = out.logits[:, -1, :].float()
        next_position = position_ids[:, -1] + 1
        if len(prompts) < len(rows):  # rows sharing a prompt get copies of its KV cache row
            expand = torch.tensor(row_prompt, device=device)
            cache.batch_select_indices(expand)
            logits, attention_mask, next_position = (
                logits[expand],
                attention_mask[expand],
                next_position[expand],
            )
        return _Prefilled(cache=cache, logits=logits, attention_mask=attention_mask, next_position=next_position)


@dataclass
class _Prefilled:
    """Rows whose prompts just ran: their KV cache (one entry per row), the logits of their first token, their
    attention mask (``[rows, columns]``) and the position of their next token."""

    cache: Any
    logits: torch.Tensor
    attention_mask: torch.Tensor
    next_position: torch.Tensor


@dataclass
class _CachedPrefix:
    """The KV cache of a prompt prefix that a batch's prompts shared (an agent's system prompt and tool schema),
    kept while the batch runs so that requests joining it later start from it instead of running it again."""

    tokens: tuple[int, ...]
    #: per layer, keys and values of shape ``[1, heads, len(tokens), head_dim]``
    layers: list[tuple[torch.Tensor, torch.Tensor]]

    @classmethod
    def of(cls, tokens: Sequence[int], cache: Any) -> _CachedPrefix:
        return cls(tuple(tokens), [(layer.keys, layer.values) for layer in cache.layers])

    def usable_length(self, prompts: list[tuple[int, ...]]) -> int:
        """How many leading tokens every prompt shares with this prefix, by :func:`_shared_prefix_length`'s rule
        (the end marker, no token id, lets the whole prefix count)."""
        return _shared_prefix_length([(*self.tokens, -1), *prompts])

    def expanded(self, length: int, rows: int) -> Any:
        """A cache holding the first ``length`` prefix tokens for each of ``rows`` prompts."""
        return DynamicCache(
            ddp_cache_data=[
                (keys[:, :, :length].expand(rows, -1, -1, -1), values[:, :, :length].expand(rows, -1, -1, -1))
                for keys, values in self.layers
            ]
        )


class _BufferLayer(DynamicLayer):
    """One layer's keys and values in buffers with room for the tokens still to come: a decode step writes its
    token in place, where :class:`DynamicLayer` concatenates (``torch.cat`` copied the whole cache every step,
    about half of a 16-row decode step on a CPU; ``benchmarks/bench_engine_batching.py``)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        super().__init__()
        self.key_buffer, self.value_buffer, self.length = keys, values, length
        self.device = keys.device
        self.is_initialized = True
        self._expose()

    def _expose(self) -> None:
        self.keys = self.key_buffer[:, :, : self.length]
        self.values = self.value_buffer[:, :, : self.length]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + key_states.shape[-2]
        if end > self.key_buffer.shape[-2]:  # more tokens than planned for: double the room
            self.key_buffer = _widened(self.key_buffer, self.length, 2 * end)
            self.value_buffer = _widened(self.value_buffer, self.length, 2 * end)
        self.key_buffer[:, :, self.length : end] = key_states
        self.value_buffer[:, :, self.length : end] = value_states
        self.length = end
        self._expose()
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.key_buffer = self.key_buffer[indices]
        self.value_buffer = self.value_buffer[indices]
        self._expose()

    def drop_leading(self, columns: int) -> None:
        """Forget the first ``columns`` columns (masked out for every row left)."""
        self.key_buffer = self.key_buffer[:, :, columns:]
        self.value_buffer = self.value_buffer[:, :, columns:]
        self.length -= columns
        self._expose()


def _widened(buffer: torch.Tensor, length: int, capacity: int) -> torch.Tensor:
    """``buffer``'s first ``length`` columns in a buffer of ``capacity`` columns (the others left unwritten:
    never read before a token is written there, and memory the system only commits once written)."""
    wider = buffer.new_empty((*buffer.shape[:2], capacity, buffer.shape[-1]))
    wider[:, :, :length] = buffer[:, :, :length]
    return wider


@dataclass
class _Running:
    """The batch being decoded: its rows, their KV cache (:class:`_BufferLayer` layers), attention mask
    (``[rows, columns]``: rows that joined at different times are right-aligned, earlier columns masked),
    next positions and the logits their next token is sampled from."""

    version: int
    rows: list[_Row] = field(default_factory=list)
    cache: Any = None
    attention_mask: torch.Tensor | None = None
    next_position: torch.Tensor | None = None
    logits: torch.Tensor | None = None

    def join(self, rows: list[_Row], part: _Prefilled) -> None:
        """Add prefilled rows: both sides are right-aligned in new buffers with room for every row's remaining
        tokens (one copy per join, instead of one per decode step)."""
        columns = part.attention_mask.shape[1]
        if self.attention_mask is not None:
            columns = max(columns, self.attention_mask.shape[1])
        room = columns + max(row.max_tokens - len(row.ids) for row in [*self.rows, *rows])
        sides = [part.cache.layers] if self.cache is None else [self.cache.layers, part.cache.layers]
        layers = [
            _BufferLayer(_aligned([side.keys for side in group], columns, room),
                         _aligned([side.values for side in group], columns, room), columns)
            for group in zip(*sides, strict=True)
        ]
        masks = [part.attention_mask] if self.attention_mask is None else [self.attention_mask, part.attention_mask]
        self.attention_mask = torch.cat(
            [torch.nn.functional.pad(mask, (columns - mask.shape[1], 0)) for mask in masks]
        )
        self.next_position = part.next_position if self.next_position is None else torch.cat(
            [self.next_position, part.next_position])
        self.logits = part.logits if self.logits is None else torch.cat([self.logits, part.logits])
        part.cache.layers = layers
        self.cache = part.cache
        self.rows = [*self.rows, *rows]

    def keep(self, slots: list[int]) -> None:
        """Keep only the rows at ``slots``; columns no row attends to any more are dropped."""
        assert self.attention_mask is not None and self.next_position is not None
        keep = torch.tensor(slots, device=self.attention_mask.device)
        self.cache.batch_select_indices(keep)
        self.attention_mask, self.next_position = self.attention_mask[keep], self.next_position[keep]
        self.rows = [self.rows[slot] for slot in slots]
        unused = int(self.attention_mask.any(dim=0).long().argmax())
        if unused:
            for layer in self.cache.layers:
                layer.drop_leading(unused)
            self.attention_mask = self.attention_mask[:, unused:]

    def advance(self, model: Any, tokens: torch.Tensor) -> None:
        """Run ``tokens`` (one per row) through the model; their logits are what the next step samples from."""
        assert self.attention_mask is not None and self.next_position is not None
        self.attention_mask = torch.cat(
            [self.attention_mask, self.attention_mask.new_ones((len(self.rows), 1))], dim=1)
        out = model(
            input_ids=tokens[:, None],
            attention_mask=self.attention_mask,
            position_ids=self.next_position[:, None],
            cache=self.cache,
            use_cache=True,
        )
        self.cache = out.cache
        self.logits = out.logits[:, -1, :].float()
        self.next_position = self.next_position + 1


def _aligned(parts: list[torch.Tensor], columns: int, room: int) -> torch.Tensor:
    """Stack ``[rows, heads, length, dim]`` tensors along rows in a ``room``-column buffer, each right-aligned
    at column ``columns`` (the columns left of a shorter part are masked out for its rows)."""
    heads, dim = parts[0].shape[1], parts[0].shape[-1]
    buffer = parts[0].new_empty((sum(part.shape[0] for part in parts), heads, room, dim))
    start = 0
    for part in parts:
        rows, pad = slice(start, start + part.shape[0]), columns - part.shape[-2]
        buffer[rows, :, :pad] = 0  # masked out, but read: attention weighs it by 0, and 0 x garbage may be NaN
        buffer[rows, :, pad:columns] = part
        start += part.shape[0]
    return buffer  # columns from ``columns`` on are written by the decode steps before they are read


def _shared_prefix_length(prompts: list[tuple[int, ...]]) -> int:
    """How many leading tokens every prompt shares, worth computing once: 0 for a single prompt or a prefix
    under :data:`SHARED_PREFIX_MIN_TOKENS`; never a whole prompt (each keeps a token whose logits start it)."""
    if len(prompts) < 2:
        return 0
    shortest = min(len(prompt) for prompt in prompts)
    length = 0
    while length < shortest - 1 and all(prompt[length] == prompts[0][length] for prompt in prompts):
        length += 1
    return length if length >= SHARED_PREFIX_MIN_TOKENS else 0


def _rows_of(pending: _Pending, eos_ids: frozenset[int]) -> list[_Row]:
    """The ``n`` independent rows of a request, each with its own generator (seeded ones reproducibly, so a
    seeded request samples the same tokens whatever else shares its batch). They stop on the request's stop
    tokens and on the model's EOS tokens."""
    request = pending.request
    stop_ids = frozenset(request.stop_token_ids) | eos_ids
    rows = []
    for index in range(request.n):
        generator = torch.Generator()
        if request.seed is None:
            generator.seed()
        else:
            generator.manual_seed((request.seed + index * _ROW_SEED_STRIDE) % 2**64)
        rows.append(
            _Row(
                prompt_ids=list(request.prompt_ids),
                max_tokens=request.max_tokens,
                temperature=request.temperature,
                top_p=request.top_p,
                top_k=request.top_k,
                stop_ids=stop_ids,
                generator=generator,
                owner=pending,
                index=index,
            )
        )
    return rows


def _sample(rows: Sequence[_Row], logits: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """Next token of each row (greedy where temperature is 0) and its logprob (see the module docstring)."""
    temperatures = torch.tensor([row.temperature or 1.0 for row in rows], device=logits.device)
    scaled = logits / temperatures[:, None]
    logprobs = torch.log_softmax(scaled, dim=-1)
    tokens = logprobs.argmax(dim=-1)
    sampled = [slot for slot, row in enumerate(rows) if row.temperature > 0]
    if sampled:
        filtered = _filter_top_k_top_p(
            scaled[sampled],
            torch.tensor([rows[slot].top_k for slot in sampled], device=logits.device),
            torch.tensor([rows[slot].top_p for slot in sampled], device=logits.device),
        )
        tokens[sampled] = _inverse_cdf_sample(
            torch.softmax(filtered, dim=-1), [rows[slot].generator for slot in sampled]
        )
    chosen = logprobs.gather(1, tokens[:, None]).squeeze(1)
    return tokens, chosen.tolist()


def _inverse_cdf_sample(probs: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One token per row of ``probs``, drawn with a single uniform number from that row's own generator.

    Inverse-CDF search over a batched cumulative sum costs a fraction of per-row ``torch.multinomial`` calls
    (over 10x less on CPU for a 49k vocabulary and 8 rows), and still gives each row a stream that no other row touches.
    Searching with ``right=True`` never lands on a token of probability 0 (a filtered one).
    """
    cdf = probs.double().cumsum(dim=-1)
    uniforms = torch.cat(
        [torch.rand(1, generator=generator, dtype=torch.float64) for generator in generators]
    )
    targets = uniforms.to(cdf.device)[:, None] * cdf[:, -1:]
    picks = torch.searchsorted(cdf, targets, right=True).squeeze(1)
    return picks.clamp(max=probs.shape[-1] - 1)


def _filter_top_k_top_p(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set logits outside each row's top-k, then outside its top-p nucleus (renormalised over the top-k, as
    Hugging Face and vLLM do), to -inf. ``top_k == 0`` and ``top_p == 1`` mean no limit."""
    if bool((top_k == 0).all()) and bool((top_p >= 1).all()):
        return scaled
    vocab = scaled.shape[-1]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=scaled.device)[None, :]
    outside_k = ranks >= torch.where(top_k > 0, top_k, vocab)[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(outside_k, float("-inf")), dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    outside_p = (mass_before >= top_p[:, None]) & (top_p < 1)[:, None]
    drop = torch.zeros_like(outside_k).scatter(1, order, outside_k | outside_p)
    return scaled.masked_fill(drop, float("-inf"))


def _settle(pending: _Pending, outcome: GenerationResult | BaseException) -> None:
    """Hand a result or an error to the caller's event loop (futures are not thread-safe)."""

    def settle() -> None:
        if pending.future.done():  # the caller was cancelled meanwhile
            return
        if isinstance(outcome, BaseException):
            pending.future.set_exception(outcome)
        else:
            pending.future.set_result(outcome)

    try:
        pending.loop.call_soon_threadsafe(settle)
    except RuntimeError:
        logger.warning("the event loop of a request closed before its result was ready; result dropped")


def _eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """Tokens that end a completion besides the request's own stop tokens: the tokenizer's and the
    generation config's EOS (chat models often list several there)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    generation_config = getattr(model, "generation_config", None)
    configured = getattr(generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured is not None:
        ids.update(configured)
    return frozenset(ids)

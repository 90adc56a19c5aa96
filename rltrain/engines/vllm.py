"""The vLLM engine: an :class:`~rltrain.engines.base.Engine` over a vLLM server's OpenAI-compatible API.

Token ids in, token ids and logprobs out, as with the embedded engine, so the gateway needs nothing vLLM-specific.
Each :class:`~rltrain.engines.base.GenerationRequest` becomes one ``POST /v1/completions`` whose ``prompt`` is the
list of token ids (vLLM does not tokenise it), asking for ``logprobs: 0`` (the sampled token's logprob only),
``return_token_ids`` (the sampled ids, stop token included) and ``return_tokens_as_token_ids`` (the logprob entries
name their token as ``token_id:N``; on a server without ``return_token_ids`` the ids are read from there). Every
sampling parameter is sent explicitly (``top_k``, ``min_p``, penalties), so neither the model's generation config
nor server defaults can change the sampled distribution. The response is checked: one logprob per id, ids
matching the logprob entries, the prompt echoed as sent, a known finish reason; anything else is a
:class:`VLLMProtocolError` rather than a silently wrong training row.

Streaming: a caller that passes ``on_token`` (the gateway's ``stream: true``) gets each token as vLLM samples it.
The request then asks for ``stream: true``; vLLM's server-sent chunks carry, per choice, the new ``token_ids``
and their ``logprobs`` (``prompt_token_ids`` on a choice's first chunk, ``finish_reason`` on its last), which are
reported to ``on_token`` and joined into the same choices a non-streamed answer holds, so the result is checked
the same way and is the same. Closing the stream (the caller was cancelled) makes vLLM abort the request. Requests
without ``on_token`` (the runner's) are not streamed: one answer, no per-token events on vLLM's API server.

Policy versions (design decision 4): with adapter sync the trainer saves its LoRA adapter after every optimiser
step and :meth:`VLLMEngine.load_adapter` hot-loads it as ``policy-v{step}``; :meth:`set_policy_version` makes a
loaded version the one that requests without an explicit version use (``adapter=None``: the agents' calls), and
older versions are unloaded by :mod:`rltrain.algorithms.weight_sync`. A request for an explicit ``policy-vN``
gets that adapter if it is loaded and a clear 400-class error if not. Before the first adapter is loaded, the
base weights serve version 0. With merged sync (TRL pushes full weights) every request uses the served model and
the version is a label the trainer sets.

Errors: a 4xx answer is a :class:`VLLMRequestError` (a ``ValueError``: the gateway answers 400), a context
overflow a :class:`~rltrain.engines.base.ContextLengthError`, anything else an
:class:`~rltrain.engines.base.EngineError` (503). When a request cannot reach a server that rltrain started and
that process has died, it is restarted (``engine.vllm.max_restarts``), the loaded adapters are loaded again and the
request is retried once; otherwise the error names the exit status and the end of the server's log. A stream that
breaks after tokens were reported is not retried (the caller already holds tokens a retry would not reproduce):
the server is restarted all the same, and the request fails with an :class:`~rltrain.engines.base.EngineError`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from rltrain.engines.base import (
    Completion,
    ContextLengthError,
    EngineError,
    GenerationRequest,
    GenerationResult,
    OnToken,
)
from rltrain.engines.vllm_server import VLLMServer, start_server

if TYPE_CHECKING:
    from rltrain.recipes import Recipe

logger = logging.getLogger(__name__)

_ADAPTER = re.compile(r"^policy-v(\d+)$")
_TOKEN_ID = re.compile(r"^token_id:(\d+)$")
#: most concurrent HTTP connections to the server (the runner's concurrency is far below this)
MAX_CONNECTIONS = 512
#: how long a health check waits for ``/health`` (a server too busy to answer this is as good as dead)
HEALTH_TIMEOUT_S = 10.0


def adapter_name(version: int) -> str:
    """The name a policy version is served under: ``policy-v{version}`` (the gateway accepts it as a model)."""
    return f"policy-v{version}"


class VLLMRequestError(EngineError, ValueError):
    """vLLM refused the request (4xx): a bad field, an unknown model or adapter, an adapter it cannot load."""


class VLLMProtocolError(EngineError):
    """vLLM answered, but not with what rltrain asked for (missing token ids or logprobs, mismatched lengths)."""


class VLLMConfigError(ValueError):
    """The recipe asks for a vLLM layout that cannot work (e.g. one server per rank)."""


@dataclass(frozen=True)
class ServedModel:
    """What the server's ``/v1/models`` says about the base model."""

    name: str
    max_model_len: int


class VLLMEngine:
    """Sample from a vLLM server at ``base_url``; ``server`` is set when rltrain started (and owns) it.

    ``model_name`` is the name clients use (the recipe's ``model.name``); ``tokenizer`` must be the served
    model's. ``adapters=False`` (merged sync) serves every version from the base model name.
    """

    #: ``generate`` takes ``on_token`` (see :func:`rltrain.engines.base.generate`)
    streams_tokens = True

    def __init__(
        self, base_url: str, tokenizer: Any, *, model_name: str, adapters: bool, request_timeout_s: float,
        server: VLLMServer | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.adapters_enabled = adapters
        self.request_timeout_s = request_timeout_s
        self.server = server
        self._admin = httpx.Client(base_url=self.base_url, timeout=request_timeout_s)
        served = self._served_model()
        self.served_name = served.name
        self.max_context = served.max_model_len
        self._lock = threading.Lock()
        self._recover_lock = threading.Lock()
        self._loaded: dict[int, Path] = {}
        self._version = 0
        self._client: httpx.AsyncClient | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    @classmethod
    def from_recipe(cls, recipe: Recipe, tokenizer: Any = None, replica: int = 0) -> VLLMEngine:
        """Connect to the recipe's running server number ``replica`` (``engine.vllm.url`` or ``urls``), or start
        replica number ``replica`` of ``vllm serve`` for the recipe (log: ``<run dir>/vllm.log``, ``vllm-1.log``,
        ...). :func:`rltrain.engines.engine_pool.vllm_engine` pools several."""
        from rltrain.models import ensure_pad_token, resolve_model

        config = recipe.engine.vllm
        urls = config.server_urls()
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size > 1 and not urls:
            raise VLLMConfigError(
                f"this is one of {world_size} training processes, and each would start its own vLLM server; start "
                "one server on GPUs of its own (scripts/train_gpu.sh does) and set engine.vllm.url to it"
            )
        model_dir = resolve_model(recipe.model.name)
        server = None
        if urls:
            base_url = urls[replica]
            _wait_for_health(base_url, config.startup_timeout_s)
        else:
            server = start_server(recipe, model_dir, replica)
            base_url = server.base_url
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            ensure_pad_token(tokenizer)
        try:
            return cls(base_url, tokenizer, model_name=recipe.model.name,
                       adapters=config.weight_sync == "adapter", request_timeout_s=config.request_timeout_s,
                       server=server)
        except BaseException:
            if server is not None:
                server.stop()
            raise

    # -- policy versions --------------------------------------------------------------------------------------
    @property
    def policy_version(self) -> int:
        return self._version

    @property
    def loaded_versions(self) -> list[int]:
        """Adapter versions loaded on the server, oldest first."""
        with self._lock:
            return sorted(self._loaded)

    def set_policy_version(self, version: int) -> None:
        """Serve ``version`` to requests that name none. With adapters it must be loaded (or be the base weights'
        version before any adapter was loaded); with merged sync it labels the weights just pushed."""
        if version < 0:
            raise ValueError(f"policy version must be >= 0, got {version}")
        with self._lock:
            if self.adapters_enabled and version not in self._loaded and (self._loaded or version != self._version):
                raise VLLMRequestError(
                    f"cannot serve policy version {version}: {adapter_name(version)} is not loaded on the vLLM "
                    f"server (loaded: {[adapter_name(v) for v in sorted(self._loaded)]}); load it first"
                )
            self._version = version

    def load_adapter(self, version: int, path: Path) -> None:
        """Hot-load the LoRA adapter saved in ``path`` as ``policy-v{version}`` (it does not become current)."""
        self._require_adapters()
        body = {"lora_name": adapter_name(version), "lora_path": str(path)}
        try:
            self._post_admin("/v1/load_lora_adapter", body)
        except VLLMRequestError as exc:
            if "already been loaded" not in str(exc):
                raise
            # left by an earlier process on a server that kept running (a resumed run): replace it
            logger.warning("vLLM already holds an older %s; replacing it", adapter_name(version))
            self._post_admin("/v1/unload_lora_adapter", {"lora_name": adapter_name(version)})
            self._post_admin("/v1/load_lora_adapter", body)
        self.adopt_adapter(version, path)
        logger.info("vLLM loaded %s from %s", adapter_name(version), path)

    def adopt_adapter(self, version: int, path: Path) -> None:
        """Record that another process (the main training rank) loaded ``policy-v{version}`` on this server."""
        self._require_adapters()
        with self._lock:
            self._loaded[version] = Path(path)

    def unload_adapter(self, version: int) -> None:
        """Unload ``policy-v{version}`` from the server; the current version cannot be unloaded."""
        self._require_unloadable(version)
        self._post_admin("/v1/unload_lora_adapter", {"lora_name": adapter_name(version)})
        self.forget_adapter(version)
        logger.info("vLLM unloaded %s", adapter_name(version))

    def forget_adapter(self, version: int) -> None:
        """Stop routing to ``policy-v{version}`` without telling the server (another process unloads it)."""
        self._require_unloadable(version)
        with self._lock:
            self._loaded.pop(version, None)

    def _require_adapters(self) -> None:
        if not self.adapters_enabled:
            raise VLLMConfigError(
                "this engine syncs merged weights (engine.vllm.weight_sync: merged); it serves no LoRA adapters"
            )

    def _require_unloadable(self, version: int) -> None:
        with self._lock:
            if version == self._version and version in self._loaded:
                raise VLLMRequestError(f"{adapter_name(version)} is the version being served; switch first")

    # -- generation -------------------------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest, on_token: OnToken | None = None) -> GenerationResult:
        """Sample ``request.n`` completions; with ``on_token``, streamed: each token is reported as it arrives."""
        if not request.prompt_ids:
            raise VLLMRequestError("prompt_ids is empty; the engine needs at least one token to continue")
        if len(request.prompt_ids) + request.max_tokens > self.max_context:
            raise ContextLengthError(
                f"prompt of {len(request.prompt_ids)} tokens + max_tokens {request.max_tokens} exceeds the context "
                f"of {self.max_context} tokens of {self.model_name!r} on vLLM"
            )
        version, target = self._route(request.adapter)
        data = await self._complete(self._body(request, target, stream=on_token is not None), on_token,
                                    request.prompt_ids)
        choices = sorted(data.get("choices") or [], key=lambda c: c.get("index", 0))
        if len(choices) != request.n:
            raise VLLMProtocolError(f"asked vLLM for n={request.n} completions, got {len(choices)} choices")
        completions = [_completion(choice, request.prompt_ids) for choice in choices]
        return GenerationResult(completions=completions, policy_version=version, model=self.model_name)

    def _route(self, adapter: str | None) -> tuple[int, str]:
        """The version a request samples with and the model name vLLM knows it by."""
        with self._lock:
            if adapter is None:
                version = self._version
            else:
                match = _ADAPTER.match(adapter)
                if match is None:
                    raise VLLMRequestError(f"adapter must look like 'policy-v<N>', got {adapter!r}")
                version = int(match.group(1))
            if not self.adapters_enabled:
                return self._version, self.served_name
            if version in self._loaded:
                return version, adapter_name(version)
            if not self._loaded and version == self._version:
                return version, self.served_name
            raise VLLMRequestError(
                f"{adapter_name(version)} is not loaded on the vLLM server; loaded: "
                f"{[adapter_name(v) for v in sorted(self._loaded)] or 'none (base weights, version 0)'}"
            )

    @staticmethod
    def _body(request: GenerationRequest, target: str, *, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": target,
            "prompt": list(request.prompt_ids),
            "max_tokens": request.max_tokens,
            "n": request.n,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "top_k": request.top_k,
            "min_p": 0.0,
            "repetition_penalty": 1.0,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            "stop_token_ids": list(request.stop_token_ids),
            "logprobs": 0,
            "return_token_ids": True,
            "return_tokens_as_token_ids": True,
        }
        if request.seed is not None:
            body["seed"] = request.seed
        if stream:
            body["stream"] = True
        return body

    async def _complete(
        self, body: dict[str, Any], on_token: OnToken | None, prompt_ids: list[int]
    ) -> dict[str, Any]:
        """POST /v1/completions (streamed when ``body["stream"]``); a dead server that rltrain started is restarted
        and the request retried once, unless tokens of this request already went to ``on_token``."""
        url = f"{self.base_url}/v1/completions"
        for attempt in (1, 2):
            generation = self.server.generation if self.server is not None else 0
            stream = _StreamedChoices(on_token, prompt_ids)
            try:
                async with self._async_client().stream("POST", url, json=body) as response:
                    if response.status_code >= 400 or not body.get("stream"):
                        await response.aread()
                        return _json_or_raise(response, f"POST {url}")
                    return await stream.read(response, f"POST {url}")
            except httpx.TimeoutException as exc:
                raise EngineError(
                    f"vLLM at {self.base_url} did not answer within engine.vllm.request_timeout_s="
                    f"{self.request_timeout_s:g} s"
                ) from exc
            except httpx.TransportError as exc:
                if stream.reported:
                    await asyncio.to_thread(self._recover, generation)  # for the next requests
                    raise EngineError(
                        f"{self._unreachable(exc)}; the stream broke after {stream.reported} token(s) were sent on, "
                        "so the request is not retried"
                    ) from exc
                if attempt == 1 and await asyncio.to_thread(self._recover, generation):
                    continue
                raise EngineError(self._unreachable(exc)) from exc
        raise AssertionError("unreachable: the second attempt returns or raises")

    def _recover(self, generation: int) -> bool:
        """Restart the server if it died (once per death, whichever request notices first); True = retry."""
        server = self.server
        if server is None:
            return False
        with self._recover_lock:
            if server.generation != generation:
                return True  # another request restarted it meanwhile
            if not server.has_died() or not server.can_restart:
                return False
            server.restart()
            with self._lock:
                loaded = dict(self._loaded)
            for version, path in sorted(loaded.items()):
                self._post_admin("/v1/load_lora_adapter", {"lora_name": adapter_name(version), "lora_path": str(path)})
            logger.warning("vLLM restarted; %d adapter(s) loaded again", len(loaded))
            return True

    def _unreachable(self, exc: Exception) -> str:
        where = f"vLLM at {self.base_url} is unreachable ({exc!r})"
        if self.server is None:
            return f"{where}; is the server at engine.vllm.url still running?"
        return f"{where}: {self.server.describe_exit()}"

    def _async_client(self) -> httpx.AsyncClient:
        """One connection pool per event loop (the gateway serves from one loop; tests may use several)."""
        loop = asyncio.get_running_loop()
        if self._closed:
            raise EngineError(f"engine {self.model_name!r} is closed")
        if self._client is None or self._client_loop is not loop:
            self._client = httpx.AsyncClient(
                timeout=self.request_timeout_s,
                limits=httpx.Limits(max_connections=MAX_CONNECTIONS, max_keepalive_connections=MAX_CONNECTIONS),
            )
            self._client_loop = loop
        return self._client

    # -- admin ------------------------------------------------------------------------------------------------
    def health_problem(self) -> str | None:
        """Why the server is not serving (``/health`` unreachable or not 200 within :data:`HEALTH_TIMEOUT_S`;
        vLLM answers 503 once its engine core died), or None when it is healthy."""
        try:
            response = self._admin.get("/health", timeout=HEALTH_TIMEOUT_S)
        except httpx.TransportError as exc:
            return f"its /health is unreachable ({exc!r})"
        if response.status_code != 200:
            return f"its /health answered {response.status_code}"
        return None

    def _served_model(self) -> ServedModel:
        data = _json_or_raise(self._admin.get("/v1/models"), f"GET {self.base_url}/v1/models")
        cards = [card for card in data.get("data") or [] if not card.get("parent")]
        if not cards:
            raise VLLMProtocolError(f"{self.base_url}/v1/models lists no base model: {data!r:.300}")
        card = next((c for c in cards if c.get("id") == self.model_name), cards[0])
        if card.get("id") != self.model_name:
            logger.warning("vLLM at %s serves %r, not %r; using it", self.base_url, card.get("id"), self.model_name)
        if not isinstance(card.get("max_model_len"), int):
            raise VLLMProtocolError(f"{self.base_url}/v1/models gives no max_model_len for {card.get('id')!r}")
        return ServedModel(name=str(card["id"]), max_model_len=card["max_model_len"])

    def _post_admin(self, path: str, body: dict[str, Any]) -> None:
        try:
            response = self._admin.post(path, json=body)
        except httpx.TransportError as exc:
            raise EngineError(self._unreachable(exc)) from exc
        if response.status_code == 404 and not _is_json_error(response):
            raise VLLMRequestError(
                f"vLLM at {self.base_url} has no {path} route: start it with --enable-lora and the environment "
                "variable VLLM_ALLOW_RUNTIME_LORA_UPDATING=True (rltrain does when it starts the server)"
            )
        _raise_for_error(response, f"POST {self.base_url}{path} {body}")

    def close(self) -> None:
        """Close the connections, and stop the server if rltrain started it."""
        self._closed = True
        self._admin.close()
        client, loop = self._client, self._client_loop
        self._client = None
        if client is not None and loop is not None and loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(client.aclose(), loop)
            except RuntimeError:  # the loop stopped meanwhile; its sockets go with it
                pass
        if self.server is not None:
            self.server.stop()


class _StreamedChoices:
    """vLLM's streamed completion chunks joined into the choices of a non-streamed answer, each token reported to
    ``on_token`` as its chunk arrives."""

    def __init__(self, on_token: OnToken | None, prompt_ids: list[int]) -> None:
        self.on_token = on_token
        self.prompt_ids = prompt_ids
        self.choices: dict[int, dict[str, Any]] = {}
        #: tokens handed to ``on_token`` so far
        self.reported = 0

    async def read(self, response: httpx.Response, what: str) -> dict[str, Any]:
        """Read the server-sent events up to ``data: [DONE]``; the answer as a non-streamed one would hold it."""
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue  # blank separators, comments
            data = line.removeprefix("data:").strip()
            if data == "[DONE]":
                return {"choices": list(self.choices.values())}
            try:
                chunk = json.loads(data)
            except ValueError:
                raise VLLMProtocolError(f"{what}: a streamed chunk that is not JSON: {data[:200]!r}") from None
            if not isinstance(chunk, dict):
                raise VLLMProtocolError(f"{what}: expected a JSON object per chunk, got {chunk!r:.200}")
            if "error" in chunk:  # vLLM failed after the stream began
                error = chunk["error"] if isinstance(chunk["error"], dict) else {"message": chunk["error"]}
                _raise_for_status(int(error.get("code") or 500), str(error.get("message")), what)
            for choice in chunk.get("choices") or []:
                self._add(choice)
        raise EngineError(f"{what}: vLLM's stream ended without data: [DONE]")

    def _add(self, delta: dict[str, Any]) -> None:
        index = int(delta.get("index", 0))
        ended = delta.get("logprobs") is None and not delta.get("token_ids")  # a chunk that only ends the choice
        ids, values = ([], []) if ended else _tokens_of(delta)
        choice = self.choices.setdefault(index, {"index": index, "token_ids": [], "logprobs": {"token_logprobs": []}})
        choice["token_ids"].extend(ids)
        choice["logprobs"]["token_logprobs"].extend(values)
        if delta.get("prompt_token_ids") is not None:
            _check_prompt(delta["prompt_token_ids"], self.prompt_ids)
            choice["prompt_token_ids"] = delta["prompt_token_ids"]
        if delta.get("finish_reason") is not None:
            choice["finish_reason"] = delta["finish_reason"]
            choice["stop_reason"] = delta.get("stop_reason")
        if self.on_token is not None:
            for token, value in zip(ids, values, strict=True):
                self.on_token(index, token, value)
                self.reported += 1


def _tokens_of(choice: dict[str, Any]) -> tuple[list[int], list[float]]:
    """The token ids and logprobs of a choice (or of a streamed chunk of one), checked against each other."""
    logprobs = choice.get("logprobs") or {}
    values = logprobs.get("token_logprobs")
    tokens = logprobs.get("tokens")
    if not isinstance(values, list):
        raise VLLMProtocolError(f"vLLM returned no logprobs.token_logprobs in choice {choice.get('index')}")
    from_tokens = _ids_of(tokens) if isinstance(tokens, list) else None
    ids = choice.get("token_ids")
    if ids is None:
        ids = from_tokens
    if ids is None:
        raise VLLMProtocolError(
            "vLLM returned neither token_ids nor token_id:N logprob tokens; it must support return_token_ids "
            "(vLLM >= 0.10.2) or return_tokens_as_token_ids"
        )
    if from_tokens is not None and from_tokens != ids:
        raise VLLMProtocolError(f"vLLM's token_ids {ids[:8]}... disagree with its logprob tokens {from_tokens[:8]}...")
    if len(values) != len(ids):
        raise VLLMProtocolError(f"vLLM returned {len(ids)} token ids but {len(values)} logprobs")
    if any(not isinstance(v, int | float) or math.isnan(v) for v in values):
        raise VLLMProtocolError(f"vLLM returned a missing or NaN logprob among {values[:8]}...")
    return [int(i) for i in ids], [float(v) for v in values]


def _completion(choice: dict[str, Any], prompt_ids: list[int]) -> Completion:
    """One vLLM choice as a :class:`Completion`, after checking that it is what was asked for."""
    ids, values = _tokens_of(choice)
    if choice.get("prompt_token_ids") is not None:
        _check_prompt(choice["prompt_token_ids"], prompt_ids)
    finish = choice.get("finish_reason")
    if finish not in ("stop", "length"):
        raise EngineError(f"vLLM ended a completion with finish_reason={finish!r} (stop_reason "
                          f"{choice.get('stop_reason')!r}); expected 'stop' or 'length'")
    return Completion(completion_ids=ids, logprobs=values, finish_reason=finish)


def _check_prompt(echoed: list[int], prompt_ids: list[int]) -> None:
    if list(echoed) != list(prompt_ids):
        raise VLLMProtocolError(
            f"vLLM sampled from a prompt of {len(echoed)} tokens, not the {len(prompt_ids)} token ids sent"
        )


def _ids_of(tokens: list[Any]) -> list[int] | None:
    ids = []
    for token in tokens:
        match = _TOKEN_ID.match(token) if isinstance(token, str) else None
        if match is None:
            return None  # tokens given as text: the server ignored return_tokens_as_token_ids
        ids.append(int(match.group(1)))
    return ids


def _json_or_raise(response: httpx.Response, what: str) -> dict[str, Any]:
    _raise_for_error(response, what)
    try:
        data = response.json()
    except ValueError:
        raise VLLMProtocolError(f"{what}: vLLM answered {response.status_code} with a body that is not JSON: "
                                f"{response.text[:200]!r}") from None
    if not isinstance(data, dict):
        raise VLLMProtocolError(f"{what}: expected a JSON object, got {data!r:.200}")
    return data


def _error_message(response: httpx.Response) -> str:
    """vLLM's error text: ``{"error": {"message": ...}}`` (current) or ``{"message": ...}`` (older servers)."""
    try:
        data = response.json()
    except ValueError:
        return response.text[:500]
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])
        if "message" in data:
            return str(data["message"])
        if "detail" in data:
            return str(data["detail"])
    return response.text[:500]


def _is_json_error(response: httpx.Response) -> bool:
    """A 404 from vLLM's own handlers carries an error message (a route that does not exist says 'Not Found')."""
    return _error_message(response) not in ("Not Found", "")


def _raise_for_error(response: httpx.Response, what: str) -> None:
    if response.status_code >= 400:
        _raise_for_status(response.status_code, _error_message(response), what)


def _raise_for_status(status: int, message: str, what: str) -> None:
    """vLLM's error ``status`` and ``message`` as the engine error the gateway maps to 400 or 503."""
    if status < 500:
        if "context length" in message or "max_model_len" in message:
            raise ContextLengthError(f"vLLM: {message}")
        raise VLLMRequestError(f"{what}: vLLM answered {status}: {message}")
    raise EngineError(f"{what}: vLLM answered {status}: {message}")


def _wait_for_health(base_url: str, timeout_s: float) -> None:
    """An external server may still be loading; wait up to ``timeout_s`` for its /health to answer 200."""
    deadline = time.monotonic() + timeout_s
    last: str = ""
    with httpx.Client(timeout=5.0) as client:
        while time.monotonic() < deadline:
            try:
                response = client.get(f"{base_url.rstrip('/')}/health")
                if response.status_code == 200:
                    return
                last = f"status {response.status_code}"
            except httpx.TransportError as exc:
                last = repr(exc)
            time.sleep(1.0)
    raise EngineError(f"the vLLM server {base_url} of engine.vllm.url/urls did not answer /health within "
                      f"{timeout_s:g} s ({last})")

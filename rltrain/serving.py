"""The serving stack of a run: engine + gateway, started together from a recipe and stopped together.

Used by evaluation, training, APO and ``rltrain serve``. The engine is the embedded transformers one or a vLLM
server (``engine.kind``); either samples with the weights of the ``model`` given (the trainer's). It is built
lazily (loading weights is the slow part), so a run whose agent never calls a model (the solver sanity check)
starts nothing heavy.
"""

from __future__ import annotations

import logging
import os
from types import TracebackType
from typing import Any, Self

from rltrain.recipes import Recipe
from rltrain.store.base import Store
from rltrain.types import Rollout

logger = logging.getLogger(__name__)


class GatewayConfigError(ValueError):
    """The gateway section asks for something unsafe or impossible (e.g. a public bind without a key)."""


def gateway_api_key(recipe: Recipe) -> str | None:
    """The API key named by ``gateway.api_key_env`` (read from the environment, never from the recipe)."""
    name = recipe.gateway.api_key_env
    if name is None:
        return None
    key = os.environ.get(name)
    if not key:
        raise GatewayConfigError(f"gateway.api_key_env names {name!r}, but that environment variable is not set")
    return key


class ServingStack:
    """Engine and gateway for one recipe. ``model``/``tokenizer`` may be the trainer's own objects."""

    def __init__(self, recipe: Recipe, store: Store, model: Any = None, tokenizer: Any = None) -> None:
        self.recipe = recipe
        self.store = store
        self._model = model
        self._tokenizer = tokenizer
        self.engine: Any = None
        self._server: Any = None
        self._service: Any = None
        self.url = ""
        self.api_key = gateway_api_key(recipe)
        from rltrain.gateway.server import is_loopback

        if self.api_key is None and not is_loopback(recipe.gateway.host):
            # checked here, before minutes of model loading; GatewayServer refuses such a bind as well
            raise GatewayConfigError(
                f"gateway.host={recipe.gateway.host!r} is not a loopback address: anyone who can reach it could use "
                "the model and write to the run's store. Set gateway.api_key_env to the name of an environment "
                "variable holding an API key, or bind 127.0.0.1"
            )

    @property
    def model_name(self) -> str:
        return self.engine.model_name if self.engine is not None else self.recipe.model.name

    def start(self) -> ServingStack:
        from rltrain.gateway.app import create_app
        from rltrain.gateway.server import GatewayServer, check_port_free

        recipe = self.recipe
        check_port_free(recipe.gateway.host, recipe.gateway.port)  # a busy port fails before the model loads
        self.engine = self._start_vllm() if recipe.engine.kind == "vllm" else self._start_transformers()
        try:
            app = create_app(self.engine, self.store, api_key=self.api_key, max_n=recipe.gateway.max_n)
            self._service = app.state.service
            self._server = GatewayServer(app, host=recipe.gateway.host, port=recipe.gateway.port)
            self.url = self._server.start()
        except BaseException:
            self.stop()  # a started vLLM process must not outlive a stack that failed to start
            raise
        logger.info("gateway for %s listening on %s", self.engine.model_name, self.url)
        return self

    def _start_transformers(self) -> Any:
        from rltrain.engines.transformers import TransformersEngine

        recipe = self.recipe
        common = {
            "max_batch_size": recipe.engine.max_batch_size,
            "batch_window_ms": recipe.engine.batch_window_ms,
            "num_threads": recipe.model.num_threads,
        }
        if self._model is not None:
            return TransformersEngine(self._model, self._tokenizer, model_name=recipe.model.name, **common)
        if recipe.model.adapter is not None:  # the adapter merged on load: the weights a merged export holds
            from rltrain.models import load_policy

            model, tokenizer = load_policy(recipe.model.name, recipe.model.adapter, dtype=recipe.model.dtype,
                                           device=recipe.model.device)
            return TransformersEngine(model, tokenizer, model_name=recipe.model.name, **common)
        logger.info("loading %s", recipe.model.name)
        return TransformersEngine.from_pretrained(
            recipe.model.name, dtype=recipe.model.dtype, device=recipe.model.device, **common
        )

    def _start_vllm(self) -> Any:
        """vLLM servers (started, or ``engine.vllm.url``/``urls``; several are pooled) that sample with ``model``'s
        weights when given."""
        from rltrain.algorithms.weight_sync import publish_served_weights
        from rltrain.engines.engine_pool import vllm_engine

        engine = vllm_engine(self.recipe, tokenizer=self._tokenizer)
        try:
            if self._model is not None:
                publish_served_weights(self.recipe, engine, self._model)
            elif self.recipe.model.adapter is not None:
                self._serve_adapter(engine)
        except BaseException:
            engine.close()
            raise
        return engine

    def _serve_adapter(self, engine: Any) -> None:
        """``model.adapter`` on vLLM: loaded at runtime (what ``--lora-modules`` does at start) as ``policy-v0``,
        the version every request that names none is routed to."""
        from rltrain.algorithms.vllm_checks import adapter_problems
        from rltrain.models import adapter_folder

        folder = adapter_folder(self.recipe.model.adapter or "").resolve()
        if not engine.adapters_enabled:
            raise GatewayConfigError("model.adapter with engine.kind=vllm needs engine.vllm.weight_sync: adapter "
                                     "(the server's --enable-lora)")
        problems = adapter_problems(folder, self.recipe.engine.vllm.max_lora_rank)
        if problems:
            raise GatewayConfigError("; ".join(problems))
        engine.load_adapter(0, folder)
        engine.set_policy_version(0)
        logger.info("vLLM serves the adapter %s as policy-v0", folder)

    def release(self, rollout: Rollout) -> None:
        """Drop the gateway's per-rollout session state once a rollout finished (bounded memory)."""
        if self._service is not None:
            self._service.release_rollout(rollout.rollout_id)

    def stop(self) -> None:
        """Close the engine, then the gateway. A run that ends normally has nothing in flight; an interrupted one
        (Ctrl-C, SIGTERM) may have generations running for agents that are gone: closing the engine first fails them
        at once and their requests are answered 503, where stopping the gateway first waited 10 s on them and then
        cancelled them, a traceback per request in the log."""
        if self.engine is not None:
            self.engine.close()
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

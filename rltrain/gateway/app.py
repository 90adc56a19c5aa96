"""The gateway's HTTP face: an OpenAI-compatible FastAPI app in front of an engine.

Routes (each also under ``/rollouts/{rollout_id}``, which attributes the call to that rollout's running attempt
and records it; the agent is simply given that base URL, see :meth:`rltrain.types.Resources.for_rollout`)::

    GET  /health
    GET  /v1/models
    POST /v1/chat/completions

Bodies are parsed here rather than by FastAPI so that malformed JSON and invalid fields come back as OpenAI
error bodies with status 400 (FastAPI would answer 422 in its own shape, which OpenAI clients do not read).
With ``api_key`` set, every route needs ``Authorization: Bearer <api_key>``; the key is compared in constant
time and never logged or recorded.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from rltrain.engines.base import Engine
from rltrain.gateway.completions import ChatService
from rltrain.gateway.errors import AuthenticationError, GatewayError, InvalidRequestError
from rltrain.gateway.responses import completion_body, stream_events
from rltrain.gateway.schemas import ChatCompletionRequest
from rltrain.store.base import Store

logger = logging.getLogger(__name__)

TAG_HEADER = "X-RLTrain-Tag"


def create_app(
    engine: Engine,
    store: Store | None,
    *,
    api_key: str | None = None,
    max_n: int = 16,
    served_models: Sequence[str] | None = None,
) -> FastAPI:
    """The gateway app. ``store=None`` serves plain ``/v1`` calls only (nothing recorded, rollout routes 404).

    ``app.state.service`` is the :class:`~rltrain.gateway.completions.ChatService` (the runner calls its
    ``release_rollout`` when a rollout finishes); ``app.state.requires_api_key`` tells the server whether a
    non-loopback bind is safe.
    """
    if api_key is not None and not api_key:
        raise ValueError("api_key must be a non-empty string or None")
    service = ChatService(engine, store, max_n=max_n, served_models=served_models or ())
    app = FastAPI(
        title="rltrain gateway",
        dependencies=[Depends(_bearer_check(api_key))] if api_key else [],
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.service = service
    app.state.requires_api_key = api_key is not None

    @app.exception_handler(GatewayError)
    async def _gateway_error(_: Request, exc: GatewayError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        body = {"error": {"message": str(exc.detail), "type": kind, "param": None, "code": None}}
        return JSONResponse(body, status_code=exc.status_code)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": engine.model_name, "policy_version": engine.policy_version}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return _model_list(service)

    @app.get("/rollouts/{rollout_id}/v1/models")
    async def rollout_models(rollout_id: str) -> dict[str, Any]:
        await service.attempt_of(rollout_id)
        return _model_list(service)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await _chat(service, request, rollout_id=None)

    @app.post("/rollouts/{rollout_id}/v1/chat/completions")
    async def rollout_chat(request: Request, rollout_id: str) -> Response:
        return await _chat(service, request, rollout_id=rollout_id)

    return app


async def _chat(service: ChatService, request: Request, *, rollout_id: str | None) -> Response:
    body = await _parse_body(request)
    tag = body.rltrain_tag or request.headers.get(TAG_HEADER)
    try:
        result = await service.complete(body, rollout_id=rollout_id, tag=tag)
    except GatewayError:
        raise
    except Exception as exc:  # the HTTP boundary: anything unexpected becomes a 500 body, and is logged
        logger.exception("chat completion failed (rollout %s)", rollout_id)
        raise GatewayError(f"internal gateway error: {type(exc).__name__}: {exc}") from exc
    fmt = service.chat_format
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        events = stream_events(result, fmt, logprobs=body.logprobs, include_usage=include_usage)
        return StreamingResponse(events, media_type="text/event-stream")
    return JSONResponse(completion_body(result, fmt, logprobs=body.logprobs))


async def _parse_body(request: Request) -> ChatCompletionRequest:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequestError(f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        params = [".".join(str(part) for part in error["loc"]) for error in errors]
        described = "; ".join(
            f"{param or 'body'}: {error['msg']}" for param, error in zip(params, errors[:3], strict=False)
        )
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        raise InvalidRequestError(f"invalid request: {described}{more}", param=params[0] or None) from None


def _model_list(service: ChatService) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "rltrain"}
            for name in service.model_names()
        ],
    }


def _bearer_check(api_key: str) -> Callable[[Request], Awaitable[None]]:
    """A dependency that refuses requests without ``Authorization: Bearer <api_key>``."""
    expected = f"Bearer {api_key}".encode()

    async def check(request: Request) -> None:
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            raise AuthenticationError(
                "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )

    return check

"""The gateway's HTTP face: an OpenAI-compatible FastAPI app in front of an engine.

Routes (each also under ``/rollouts/{rollout_id}``, which attributes the call to that rollout's running attempt
and records it, and under ``/rollouts/{rollout_id}/attempts/{attempt_no}``, which does so only while that very
attempt runs; the runner gives each attempt's agent the latter as its base URL, see
:meth:`rltrain.types.Resources.for_rollout`, so a call from an attempt that already ended, a timed-out agent
waking up, is refused with 409 instead of landing in the retry that replaced it)::

    GET  /health
    GET  /v1/models
    POST /v1/chat/completions

No route reads spans back: the gateway only appends to the rollout a call names.

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
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from rltrain.engines.base import Engine
from rltrain.gateway.completions import ChatService
from rltrain.gateway.errors import (
    AuthenticationError,
    GatewayError,
    InvalidRequestError,
    RequestTooLargeError,
)
from rltrain.gateway.responses import completion_body, stream_events
from rltrain.gateway.schemas import ChatCompletionRequest
from rltrain.store.base import Store

logger = logging.getLogger(__name__)

TAG_HEADER = "X-RLTrain-Tag"
#: A request body is refused (413) beyond ``BODY_BYTES_BASE + BODY_BYTES_PER_TOKEN * engine.max_context``: what
#: the messages say must fit the context, and even JSON-escaped text rarely takes 64 bytes per token; the base
#: leaves room for tool schemas and the fields that are not rendered. Read before parsing, so an oversized body
#: costs neither memory nor a JSON parse.
BODY_BYTES_BASE = 2**20
BODY_BYTES_PER_TOKEN = 64


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
    max_body_bytes = BODY_BYTES_BASE + BODY_BYTES_PER_TOKEN * engine.max_context

    @app.exception_handler(GatewayError)
    async def _gateway_error(_: Request, exc: GatewayError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _path_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        # Bodies are parsed by hand (see _parse_body); only a path parameter (attempt_no) can fail here.
        [first, *_rest] = exc.errors()
        param = ".".join(str(part) for part in first["loc"])
        error = InvalidRequestError(f"{param}: {first['msg']} (got {first.get('input')!r:.60})", param=param)
        return JSONResponse(error.body(), status_code=error.status)

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

    @app.get("/rollouts/{rollout_id}/attempts/{attempt_no}/v1/models")
    async def attempt_models(rollout_id: str, attempt_no: int) -> dict[str, Any]:
        await service.attempt_of(rollout_id, attempt_no)
        return _model_list(service)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await _chat(service, request, max_body_bytes, rollout_id=None)

    @app.post("/rollouts/{rollout_id}/v1/chat/completions")
    async def rollout_chat(request: Request, rollout_id: str) -> Response:
        return await _chat(service, request, max_body_bytes, rollout_id=rollout_id)

    @app.post("/rollouts/{rollout_id}/attempts/{attempt_no}/v1/chat/completions")
    async def attempt_chat(request: Request, rollout_id: str, attempt_no: int) -> Response:
        return await _chat(service, request, max_body_bytes, rollout_id=rollout_id, attempt_no=attempt_no)

    return app


async def _chat(
    service: ChatService,
    request: Request,
    max_body_bytes: int,
    *,
    rollout_id: str | None,
    attempt_no: int | None = None,
) -> Response:
    body = await _parse_body(request, max_body_bytes)
    tag = body.rltrain_tag or request.headers.get(TAG_HEADER)
    try:
        result = await service.complete(body, rollout_id=rollout_id, attempt_no=attempt_no, tag=tag)
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


async def _read_body(request: Request, max_bytes: int) -> bytes:
    """The body, refused (413) as soon as it is known to exceed ``max_bytes``: from its Content-Length, or
    while it streams in (a chunked body declares none)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise RequestTooLargeError(
            f"the request body has {int(declared)} bytes; this gateway accepts at most {max_bytes} "
            "(more than the model's context could hold)"
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise RequestTooLargeError(
                f"the request body exceeds {max_bytes} bytes, the most this gateway accepts "
                "(more than the model's context could hold)"
            )
        chunks.append(chunk)
    return b"".join(chunks)


async def _parse_body(request: Request, max_bytes: int) -> ChatCompletionRequest:
    raw = await _read_body(request, max_bytes)
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidRequestError("the request body is JSON nested too deeply to read") from None
    if not isinstance(data, dict):
        raise InvalidRequestError(f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        params = [".".join(str(part) for part in error["loc"]) for error in errors]
        described = "; ".join(
            f"{param}: {error['msg']} (got {error.get('input')!r:.60})" if param else f"body: {error['msg']}"
            for param, error in zip(params, errors[:3], strict=False)
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

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
With ``api_key`` set, every route needs ``Authorization: Bearer <api_key>`` (scheme in any case); the key is
compared in constant time and never logged or recorded.

Bounds checked before any work: the body's size (413) and the time it takes to arrive (408, ``BODY_TIMEOUT_S``);
a lone UTF-16 surrogate anywhere in it is a 400 naming the field. A client that disconnects, while its body
arrives or while its completion is generated (streamed or not), costs one log line and cancels the generation.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from rltrain.engines.base import Engine
from rltrain.gateway.completions import ChatService
from rltrain.gateway.errors import (
    AuthenticationError,
    GatewayError,
    GatewayStoppingError,
    InvalidRequestError,
    RequestTimeoutError,
    RequestTooLargeError,
)
from rltrain.gateway.responses import ChatResult, LiveStream, completion_body
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
#: the longest a request body may take to arrive once its headers did (408 after): a client that sends half a
#: body and waits must not hold a connection and a task forever
BODY_TIMEOUT_S = 30.0
#: a lone UTF-16 surrogate as JSON writes it (``\ud800``); a pair is one character once parsed, a lone one is not
#: text at all and no tokenizer or store can take it
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def create_app(
    engine: Engine,
    store: Store | None,
    *,
    api_key: str | None = None,
    max_n: int = 16,
    served_models: Sequence[str] | None = None,
    body_timeout_s: float = BODY_TIMEOUT_S,
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
    limits = BodyLimits(BODY_BYTES_BASE + BODY_BYTES_PER_TOKEN * engine.max_context, body_timeout_s)

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, exc: ClientDisconnect) -> Response:
        # one line, not uvicorn's traceback: a client that hangs up mid-body is the client's business
        logger.info("client disconnected before its request body arrived (%s)", request.url.path)
        return Response(status_code=499)

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
        return await _chat(service, request, limits, rollout_id=None)

    @app.post("/rollouts/{rollout_id}/v1/chat/completions")
    async def rollout_chat(request: Request, rollout_id: str) -> Response:
        return await _chat(service, request, limits, rollout_id=rollout_id)

    @app.post("/rollouts/{rollout_id}/attempts/{attempt_no}/v1/chat/completions")
    async def attempt_chat(request: Request, rollout_id: str, attempt_no: int) -> Response:
        return await _chat(service, request, limits, rollout_id=rollout_id, attempt_no=attempt_no)

    return app


async def _chat(
    service: ChatService,
    request: Request,
    limits: BodyLimits,
    *,
    rollout_id: str | None,
    attempt_no: int | None = None,
) -> Response:
    body = await _parse_body(request, limits)
    tag = body.rltrain_tag or request.headers.get(TAG_HEADER)
    if body.stream:
        return await _stream(service, request, body, tag, rollout_id=rollout_id, attempt_no=attempt_no)
    work = asyncio.ensure_future(_served(service.complete(body, rollout_id=rollout_id, attempt_no=attempt_no,
                                                          tag=tag), rollout_id))
    if not await _finished_unless_disconnected(request, work):
        return Response(status_code=499)  # nobody reads it; the generation was cancelled
    return JSONResponse(completion_body(work.result(), service.chat_format, logprobs=body.logprobs))


async def _served(call: Awaitable[ChatResult], rollout_id: str | None) -> ChatResult:
    """The HTTP boundary: anything unexpected becomes a 500 body, and is logged."""
    try:
        return await call
    except GatewayError:
        raise
    except Exception as exc:
        logger.exception("chat completion failed (rollout %s)", rollout_id)
        raise GatewayError(f"internal gateway error: {type(exc).__name__}: {exc}") from exc


async def _finished_unless_disconnected(request: Request, work: asyncio.Future[Any], *also: asyncio.Future[Any]) -> bool:
    """Wait for ``work`` (or one of ``also``); when the client disconnects first, cancel ``work`` (the engine
    stops generating for it) and return False. An exception of ``work`` is raised."""
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, watcher, *also}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not work.done() and not any(f.done() for f in also):
        work.cancel()
        logger.info("client disconnected; its generation was cancelled")
        return False
    if work.cancelled():  # by the engine or the event loop shutting down, not by this client
        raise GatewayStoppingError()
    if work.done():
        work.result()  # raises the call's error
    return True


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body was read, so the next message says so)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _stream(
    service: ChatService, request: Request, body: ChatCompletionRequest, tag: str | None, *,
    rollout_id: str | None, attempt_no: int | None,
) -> Response:
    """A streamed completion: chunks leave as the engine samples tokens. An error before the first token is an
    HTTP error like any other; after it (a generation cancelled by shutdown included), the stream ends with the
    error body."""
    stream = LiveStream(
        service.chat_format, request_id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()),
        model=body.model, n=body.n, stops=body.stop_strings, tools=bool(body.active_tools), logprobs=body.logprobs,
    )
    tokens: asyncio.Queue[tuple[int, int, float]] = asyncio.Queue()
    work = asyncio.ensure_future(_served(service.complete(
        body, rollout_id=rollout_id, attempt_no=attempt_no, tag=tag,
        on_token=lambda index, token, logprob: tokens.put_nowait((index, token, logprob)),
    ), rollout_id))
    first = asyncio.ensure_future(tokens.get())
    if not await _finished_unless_disconnected(request, work, first):
        first.cancel()
        return Response(status_code=499)
    include_usage = body.stream_options is not None and body.stream_options.include_usage

    async def events() -> AsyncIterator[str]:
        try:
            for event in stream.start():
                yield event
            next_token = first
            while True:
                await asyncio.wait({work, next_token}, return_when=asyncio.FIRST_COMPLETED)
                if next_token.done():
                    event = stream.token(*next_token.result())
                    if event is not None:
                        yield event
                    next_token = asyncio.ensure_future(tokens.get())
                    continue
                next_token.cancel()
                while not tokens.empty():
                    event = stream.token(*tokens.get_nowait())
                    if event is not None:
                        yield event
                break
            try:
                if work.cancelled():  # by the engine or the event loop shutting down, mid-stream
                    raise GatewayStoppingError()
                result = work.result()
            except GatewayError as exc:
                for event in stream.error(exc.body()):
                    yield event
                return
            for event in stream.finish(result, include_usage=include_usage):
                yield event
        finally:  # the client went away mid-stream (or the stream ended): no work left behind
            if not work.done():
                work.cancel()
                logger.info("client disconnected mid-stream; its generation was cancelled")

    return StreamingResponse(events(), media_type="text/event-stream")


@dataclass(frozen=True)
class BodyLimits:
    """How big a request body may be, and how long it may take to arrive."""

    max_bytes: int
    timeout_s: float


async def _read_body(request: Request, limits: BodyLimits) -> bytes:
    """The body within ``limits.timeout_s`` (else 408), refused (413) as soon as it is known to exceed
    ``limits.max_bytes``: from its Content-Length, or while it streams in (a chunked body declares none)."""
    try:
        async with asyncio.timeout(limits.timeout_s):
            return await _read_body_within(request, limits.max_bytes)
    except TimeoutError:
        raise RequestTimeoutError(
            f"the request body did not arrive within {limits.timeout_s:g} s of its headers; send it whole"
        ) from None


async def _read_body_within(request: Request, max_bytes: int) -> bytes:
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


async def _parse_body(request: Request, limits: BodyLimits) -> ChatCompletionRequest:
    raw = await _read_body(request, limits)
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidRequestError("the request body is JSON nested too deeply to read") from None
    if not isinstance(data, dict):
        raise InvalidRequestError(f"the request body must be a JSON object, got {type(data).__name__}")
    if _SURROGATE_ESCAPE.search(raw):
        _refuse_lone_surrogates(data, "")
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


def _refuse_lone_surrogates(value: Any, path: str) -> None:
    """400 naming the first field (key or value) that holds a lone UTF-16 surrogate."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidRequestError(
                f"{path or 'body'}: contains a lone UTF-16 surrogate ({value[exc.start]!r} at character "
                f"{exc.start}), which is not text; send valid Unicode (surrogates only in pairs)",
                param=path or None,
            ) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _refuse_lone_surrogates(key, path)
            _refuse_lone_surrogates(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _refuse_lone_surrogates(item, f"{path}.{index}")


def _model_list(service: ChatService) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "rltrain"}
            for name in service.model_names()
        ],
    }


def _bearer_check(api_key: str) -> Callable[[Request], Awaitable[None]]:
    """A dependency that refuses requests without ``Authorization: Bearer <api_key>`` (the scheme in any case, as
    RFC 9110 has it: clients send ``bearer`` too)."""
    expected = api_key.encode()

    async def check(request: Request) -> None:
        scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
            raise AuthenticationError(
                "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )

    return check

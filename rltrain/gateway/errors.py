"""The gateway's errors, each carrying its HTTP status and its OpenAI-style error body.

Agents talk to the gateway through stock OpenAI clients, which turn a non-2xx response into a typed exception
(``openai.BadRequestError``, ``NotFoundError`` ...) and show ``error.message``. So every refusal is one of these
classes, raised where the problem is found and rendered once by the app, with a message that names the field
or value and what was expected.
"""

from __future__ import annotations

from typing import Any


class GatewayError(Exception):
    """A request the gateway refuses or cannot serve. Subclasses fix ``status`` and ``type``."""

    status: int = 500
    type: str = "server_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        """The OpenAI error body: ``{"error": {"message", "type", "param", "code"}}``."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class GatewayStoppingError(GatewayError):
    """The request's generation was cancelled because the gateway (or its engine) is shutting down (503): the
    client may retry against a running server. Without it the cancellation surfaced as an ASGI traceback."""

    status = 503

    def __init__(self) -> None:
        super().__init__("the gateway is shutting down; its generation for this request was cancelled",
                         code="server_shutting_down")


class InvalidRequestError(GatewayError):
    """Malformed JSON, a field that fails validation, or values the model cannot serve (400)."""

    status = 400
    type = "invalid_request_error"


class ContextLengthExceededError(InvalidRequestError):
    """The prompt, or prompt plus ``max_tokens``, does not fit the engine's context window (400)."""

    def __init__(self, message: str, *, param: str | None = "messages") -> None:
        super().__init__(message, param=param, code="context_length_exceeded")


class RequestTooLargeError(InvalidRequestError):
    """A request body larger than anything the engine's context could hold (413)."""

    status = 413

    def __init__(self, message: str) -> None:
        super().__init__(message, code="request_too_large")


class RequestTimeoutError(InvalidRequestError):
    """The request body did not arrive in time (a half-sent or trickling body) (408)."""

    status = 408

    def __init__(self, message: str) -> None:
        super().__init__(message, code="request_timeout")


class AuthenticationError(GatewayError):
    """The gateway has an API key and the request did not carry it (401)."""

    status = 401
    type = "authentication_error"


class NotFoundError(GatewayError):
    """An unknown model, rollout or route (404)."""

    status = 404
    type = "not_found_error"


class ConflictError(GatewayError):
    """The call names a rollout that is not running (finished, or back in the queue) (409)."""

    status = 409
    type = "conflict_error"


class EngineUnavailableError(GatewayError):
    """The engine refused or failed the generation (overloaded, stopped, crashed) (503)."""

    status = 503
    type = "engine_unavailable"

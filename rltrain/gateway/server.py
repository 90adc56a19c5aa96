"""Running the gateway app with uvicorn in a background thread, on its own event loop.

The trainer, the runner and the agents live in one process on the default CPU setup; the gateway must keep
answering while the caller's thread does something else (trains, waits on rollouts), so it gets a thread and an
event loop of its own. The socket is bound before the thread starts, so port 0 yields a free port that is known
(and reserved) at once, and :meth:`GatewayServer.start` returns only once the server accepts connections.

Security: the gateway serves a model and writes to the store, with no authentication unless an API key is set.
It binds 127.0.0.1 by default; any non-loopback address is refused unless the app was created with an API key.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import threading
import time
from types import TracebackType
from typing import Self

import uvicorn
from fastapi import FastAPI

logger = logging.getLogger(__name__)


class InsecureBindError(ValueError):
    """A non-loopback address was asked for by an app without an API key."""


class GatewayServerError(RuntimeError):
    """The server thread failed to start (or died while starting)."""


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: only "localhost" is known to stay on this machine
        return False


def _listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port``; :class:`GatewayServerError` when the address is taken or invalid."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted connections only when the listening
    # socket's protocol is TCP; with protocol 0 every keep-alive response waited ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise GatewayServerError(f"cannot bind the gateway to {host}:{port}: {exc.strerror or exc}") from None
    return sock


def check_port_free(host: str, port: int) -> None:
    """Raise :class:`GatewayServerError` now when ``host:port`` cannot be bound: before minutes of model loading,
    not after (port 0, any free port, always can)."""
    if port != 0:
        _listening_socket(host, port).close()


class GatewayServer:
    """``with GatewayServer(app) as server: ...`` serves ``app`` at ``server.base_url`` during the block."""

    def __init__(
        self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning"
    ) -> None:
        if not is_loopback(host) and not getattr(app.state, "requires_api_key", False):
            raise InsecureBindError(
                f"refusing to bind the gateway to {host!r} without an API key: anyone who can reach that address "
                "could use the model and write to the run's store. Bind 127.0.0.1, or create the app with "
                "create_app(..., api_key=...)"
            )
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be in [0, 65535] (0 = any free port), got {port}")
        self.app = app
        self.host = host
        self.port = port
        self.log_level = log_level
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> str:
        """Start serving; returns the base URL once connections are accepted."""
        if self._thread is not None:
            raise GatewayServerError(f"the gateway server at {self.base_url} is already started")
        sock = _listening_socket(self.host, self.port)
        self.port = sock.getsockname()[1]
        # log_config=None: leave the application's logging configuration alone (uvicorn's loggers propagate)
        config = uvicorn.Config(
            self.app, log_level=self.log_level, log_config=None, lifespan="off", access_log=False
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._serve, args=(self._server, sock), name="rltrain-gateway", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise GatewayServerError(
                    f"the gateway server at {self.base_url} did not start within {timeout_s} s: {self._error!r}"
                )
            time.sleep(0.01)
        logger.info("gateway serving at %s", self.base_url)
        return self.base_url

    def _serve(self, server: uvicorn.Server, sock: socket.socket) -> None:
        try:
            asyncio.run(server.serve(sockets=[sock]))
        except BaseException as exc:  # reported by start(); the thread must not die silently
            self._error = exc
            logger.exception("gateway server thread failed")
        finally:
            sock.close()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop accepting, finish in-flight requests (up to ``timeout_s``), join the thread."""
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(timeout_s)
        self._server = None
        self._thread = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

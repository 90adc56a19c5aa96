"""A live gateway for the fault-injection tests: served on loopback over a store whose rollouts are running."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import openai

from rltrain.gateway import GatewayServer, create_app
from rltrain.gateway.completions import ChatService
from rltrain.store.base import Store
from rltrain.types import Rollout, Task

QUESTION = [{"role": "user", "content": "Which room is free at nine?"}]


@dataclass
class Served:
    """A gateway serving on loopback: its URL, its chat service, the store it records into."""

    url: str
    service: ChatService
    store: Store

    def base_url(self, rollout_id: str, attempt_no: int | None = 1) -> str:
        """The base URL the runner lends an attempt (``attempt_no=None``: the rollout-wide route)."""
        attempt = "" if attempt_no is None else f"/attempts/{attempt_no}"
        return f"{self.url}/rollouts/{rollout_id}{attempt}/v1"

    def client(self, rollout_id: str, attempt_no: int | None = 1, api_key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url(rollout_id, attempt_no), api_key=api_key, max_retries=0)

    def post(self, path: str, body: Any, **kwargs: Any) -> httpx.Response:
        """POST ``body`` (JSON-encoded unless already bytes/str) to ``path`` under the gateway."""
        content = body if isinstance(body, bytes | str) else httpx.Request("POST", "/", json=body).content
        headers = {"content-type": "application/json", **kwargs.pop("headers", {})}
        return httpx.post(f"{self.url}{path}", content=content, headers=headers, timeout=60, **kwargs)


def start_rollouts(store: Store, ids: list[str]) -> None:
    """Enqueue rollouts with these ids and claim them all: each is running its attempt 1."""
    store.enqueue_rollouts([Rollout(rollout_id=rid, task=Task(id=rid, payload={})) for rid in ids])
    for _ in ids:
        assert store.claim_rollout("test-worker") is not None


@contextmanager
def serve(engine: Any, store: Store, **options: Any) -> Iterator[Served]:
    """Serve ``create_app(engine, store, **options)`` on 127.0.0.1 for the duration of the block."""
    app = create_app(engine, store, **options)
    with GatewayServer(app) as server:
        yield Served(url=server.base_url, service=app.state.service, store=store)


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    """The OpenAI-shaped error of a refused request, after checking its status and shape."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error

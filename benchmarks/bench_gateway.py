"""Gateway overhead per chat call: the latency a call through rltrain's gateway adds over calling the engine.

The engine answers instantly (an :class:`~rltrain.engines.base.Engine` whose ``generate`` returns a fixed
21-token completion with logprobs at once): what is measured is the gateway, not a model. Two servers run in
this process, uvicorn in a thread each, and are called over HTTP with keep-alive httpx clients, alternating call
by call:

* **direct**: a minimal FastAPI endpoint that hands precomputed prompt ids to the same engine and returns the
  completion's text as a chat completion (the cheapest HTTP face an engine can have);
* **gateway**: rltrain's app (:func:`~rltrain.gateway.create_app`) served as rltrain serves it
  (:class:`~rltrain.gateway.GatewayServer`), with the real SmolLM2 tokenizer: body
  validation, chat template, tokenisation, decode, and, on the rollout route, attribution to a running rollout
  and the llm span recorded in the store before the answer (each call goes to a rollout of its own, as a
  rollout's first turn does). The rollouts are claimed through the same store object the gateway records into,
  as in training, where runner and gateway share the run's store: so the SQLite store takes the span into
  memory on the answer's path and writes it at the rollout's next durability point (its ``finish_attempt``
  at the latest; see ``Store.add_spans_nowait``). The benchmark checks at the end that the spans are there.

The figure is the median over calls of (gateway latency - direct latency), medians of 3 rounds. Target (issue 8):
<= 0.5 ms added. The peer (Agent Lightning 0.3.0's ``LLMProxy``, a LiteLLM proxy in front of an
OpenAI-compatible server) is measured the same way in its own venv: the proxy in front of a minimal endpoint
returning the same completion, against that endpoint called directly.
``python benchmarks/bench_gateway.py`` (``--json`` for machine-readable rows).
"""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import uvicorn

# At module level: FastAPI resolves the direct endpoint's annotations (``Request``) in this module's globals.
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPEATS, Row, log, median, report
from _peer import PeerError, run_peer
from _workloads import gateway_messages

CALLS = 200
WARMUP = 20
REPLY = "Room 204 suits you best: a quiet double with a garden view, breakfast included."

PEER_SCRIPT = r"""
import asyncio, json, logging, os, statistics, sys, threading, time
logging.disable(logging.CRITICAL)
import httpx, uvicorn
from fastapi import FastAPI, Request
from agentlightning import LLMProxy
from agentlightning.store.memory import InMemoryLightningStore
from _workloads import gateway_messages

spec = json.load(sys.stdin)
reply = spec["reply"]
# This LiteLLM refuses to start without a master key, and with one its /health (which LLMProxy polls without a
# key) answers 401. The proxy binds 127.0.0.1 here, so the key is waived as LiteLLM allows for local use.
os.environ["LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY"] = "true"

backend = FastAPI()

@backend.post("/v1/chat/completions")
async def chat(request: Request):
    body = await request.json()
    return {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop",
                     "logprobs": None, "token_ids": list(range(21))}],
        "prompt_token_ids": list(range(200)),
        "usage": {"prompt_tokens": 200, "completion_tokens": 21, "total_tokens": 221},
    }

config = uvicorn.Config(backend, host="127.0.0.1", port=spec["backend_port"], log_level="error", access_log=False)
server = uvicorn.Server(config)
threading.Thread(target=server.run, daemon=True).start()
while not server.started:
    time.sleep(0.01)
backend_url = f"http://127.0.0.1:{spec['backend_port']}"

async def main():
    store = InMemoryLightningStore(thread_safe=True)
    proxy = LLMProxy(
        port=spec["proxy_port"], host="127.0.0.1", store=store, launch_mode="thread",
        model_list=[{"model_name": "policy",
                     "litellm_params": {"model": "hosted_vllm/policy", "api_base": backend_url + "/v1"}}],
    )
    await proxy.start()
    attempts = []
    for _ in range(spec["calls"] * spec["rounds"] + spec["warmup"]):
        started = await store.start_rollout(input={"q": 1})
        attempts.append((started.rollout_id, started.attempt.attempt_id))
    proxy_url = f"http://127.0.0.1:{spec['proxy_port']}"
    body = json.dumps({"model": "policy", "messages": gateway_messages(), "max_tokens": 32, "temperature": 0.0})
    headers = {"content-type": "application/json", "authorization": "Bearer none"}

    def measure():
        with httpx.Client(timeout=30) as direct, httpx.Client(timeout=30) as via:
            added, direct_ms, proxy_ms = [], [], []
            for i, (rid, aid) in enumerate(attempts):
                start = time.perf_counter()
                r1 = direct.post(backend_url + "/v1/chat/completions", content=body, headers=headers)
                mid = time.perf_counter()
                r2 = via.post(f"{proxy_url}/rollout/{rid}/attempt/{aid}/v1/chat/completions", content=body,
                              headers=headers)
                end = time.perf_counter()
                assert r1.status_code == 200 and r2.status_code == 200, (r1.text, r2.text)
                assert r2.json()["choices"][0]["message"]["content"] == reply, r2.text
                if i >= spec["warmup"]:
                    direct_ms.append((mid - start) * 1e3)
                    proxy_ms.append((end - mid) * 1e3)
                    added.append((end - mid - (mid - start)) * 1e3)
            return added, direct_ms, proxy_ms

    added, direct_ms, proxy_ms = await asyncio.to_thread(measure)
    n = spec["calls"]
    rounds = [slice(warm, warm + n) for warm in range(0, n * spec["rounds"], n)]
    result = {
        "added_ms": statistics.median(statistics.median(added[s]) for s in rounds),
        "direct_ms": statistics.median(direct_ms),
        "proxy_ms": statistics.median(proxy_ms),
    }
    await proxy.stop()
    print(json.dumps(result))

asyncio.run(main())
"""


class InstantEngine:
    """An engine that answers at once with the same completion: the workload for measuring the gateway."""

    model_name = "policy"
    max_context = 8192

    def __init__(self, tokenizer: Any) -> None:
        from rltrain.engines.base import Completion, GenerationResult

        self.tokenizer = tokenizer
        ids = list(tokenizer(REPLY, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
        self._result = GenerationResult(
            completions=[Completion(completion_ids=ids, logprobs=[-0.25] * len(ids), finish_reason="stop")],
            model=self.model_name,
        )

    @property
    def policy_version(self) -> int:
        return 0

    async def generate(self, request: Any) -> Any:
        return self._result

    def close(self) -> None:
        """Nothing to stop."""


def direct_app(engine: InstantEngine, prompt_ids: list[int]) -> Any:
    """The engine behind the thinnest OpenAI-shaped endpoint: no templating, no tokenising, no recording."""
    from rltrain.engines.base import GenerationRequest

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    text = REPLY

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> JSONResponse:
        body = json.loads(await request.body())
        result = await engine.generate(
            GenerationRequest(prompt_ids=prompt_ids, max_tokens=body["max_tokens"])
        )
        completion = result.completions[0]
        return JSONResponse(
            {
                "id": "chatcmpl-direct",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": None,
                        "finish_reason": completion.finish_reason,
                    }
                ],
                "usage": {
                    "prompt_tokens": len(prompt_ids),
                    "completion_tokens": len(completion.completion_ids),
                    "total_tokens": len(prompt_ids) + len(completion.completion_ids),
                },
            }
        )

    return app


@contextmanager
def serve_direct(app: FastAPI) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a thread, on a TCP socket made the way uvicorn makes its own (protocol
    ``IPPROTO_TCP``, so asyncio sets ``TCP_NODELAY`` on every connection); yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def load_tokenizer() -> Any:
    from transformers import AutoTokenizer

    from rltrain.models import prepare_default_model

    return AutoTokenizer.from_pretrained(prepare_default_model())


def measure_rltrain(store_kind: str, tokenizer: Any, routes: tuple[str, ...]) -> dict[str, float]:
    """Median added latency (ms) over the direct endpoint of each of ``routes``: ``"rollout"`` (attributed and
    recorded in a ``store_kind`` store) and ``"plain"`` (``/v1``, nothing recorded)."""
    import httpx

    from rltrain.gateway import GatewayServer, create_app
    from rltrain.store import MemoryStore, SqliteStore
    from rltrain.types import Rollout, Task

    engine = InstantEngine(tokenizer)
    messages = gateway_messages()
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    body = json.dumps({"model": "policy", "messages": messages, "max_tokens": 32, "temperature": 0.0})
    headers = {"content-type": "application/json"}
    n_rollouts = REPEATS * CALLS + WARMUP
    with tempfile.TemporaryDirectory(prefix="rltrain-bench-gateway-") as tmp:
        store = SqliteStore(Path(tmp) / "store.sqlite") if store_kind == "sqlite" else MemoryStore()
        store.enqueue_rollouts([Rollout(task=Task(id=f"t{i}", payload={})) for i in range(n_rollouts)])
        rollout_ids = [store.claim_rollout("bench")[0].rollout_id for _ in range(n_rollouts)]  # type: ignore[index]
        gateway = GatewayServer(create_app(engine, store))
        with (
            gateway,
            serve_direct(direct_app(engine, prompt_ids)) as direct_url,
            httpx.Client(timeout=30) as to_direct,
            httpx.Client(timeout=30) as to_gateway,
        ):
            added: dict[str, list[float]] = {route: [] for route in routes}
            for i, rollout_id in enumerate(rollout_ids):
                urls = {
                    "rollout": f"{gateway.base_url}/rollouts/{rollout_id}/v1/chat/completions",
                    "plain": f"{gateway.base_url}/v1/chat/completions",
                }
                for route in routes:
                    url = urls[route]
                    start = time.perf_counter()
                    first = to_direct.post(f"{direct_url}/v1/chat/completions", content=body, headers=headers)
                    mid = time.perf_counter()
                    second = to_gateway.post(url, content=body, headers=headers)
                    end = time.perf_counter()
                    assert first.status_code == 200 and second.status_code == 200, (first.text, second.text)
                    assert second.json()["choices"][0]["message"]["content"] == REPLY, second.text
                    if i >= WARMUP:
                        added[route].append((end - mid - (mid - start)) * 1e3)
        if "rollout" in routes:
            recorded = store.get_spans(rollout_ids[-1])
            assert len(recorded) == 1 and recorded[0].attributes["prompt_ids"] == prompt_ids, (
                "span not recorded"
            )
        store.close()
    return {
        route: median([statistics.median(values[k * CALLS : (k + 1) * CALLS]) for k in range(REPEATS)])
        for route, values in added.items()
    }


def measure_peer() -> float | None:
    import socket

    ports = []
    for _ in range(2):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
    spec = {
        "calls": CALLS,
        "rounds": REPEATS,
        "warmup": WARMUP,
        "reply": REPLY,
        "backend_port": ports[0],
        "proxy_port": ports[1],
    }
    try:
        return float(run_peer(PEER_SCRIPT, spec, timeout_s=300)["added_ms"])
    except PeerError as exc:
        log(f"gateway: the peer's LLMProxy could not be measured: {exc}")
        return None


def run() -> list[Row]:
    log("gateway: loading the SmolLM2 tokenizer")
    tokenizer = load_tokenizer()
    results = {}
    for kind, routes in (("sqlite", ("rollout",)), ("memory", ("rollout", "plain"))):
        log(f"gateway: rltrain gateway ({kind} store) vs direct endpoint, {REPEATS} x {CALLS} calls")
        results[kind] = measure_rltrain(kind, tokenizer, routes)
    log("gateway: Agent Lightning LLMProxy vs direct endpoint")
    peer = measure_peer()
    return [
        Row(
            "gateway",
            "added per call, rollout route, SqliteStore",
            "ms",
            results["sqlite"]["rollout"],
            peer,
            higher_is_better=False,
            target_abs=0.5,
        ),
        Row(
            "gateway",
            "added per call, rollout route, MemoryStore",
            "ms",
            results["memory"]["rollout"],
            peer,
            higher_is_better=False,
            target_abs=0.5,
        ),
        Row(
            "gateway",
            "added per call, plain /v1 route (nothing recorded)",
            "ms",
            results["memory"]["plain"],
            peer,
            higher_is_better=False,
            note="information",
        ),
    ]


if __name__ == "__main__":
    report(run())

"""What a careless or hostile HTTP client can do to the gateway, on the tiny engine: stream and expect tokens as
they are sampled, hang up (streaming or not, mid-body or mid-generation), send half a body, send text that is
not text (a lone UTF-16 surrogate), spell the auth scheme in lower case.

Pacing without clocks: the streaming and cancellation tests gate the model's forward pass, so the engine
samples a token only when the test lets it, and what is checked is the order of events (which token the
first chunk carried, how many tokens the engine sampled for a request whose client left), never a duration.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from live_gateway import QUESTION, error_of, serve, start_rollouts

from rltrain.engines.base import EngineError, GenerationRequest
from rltrain.engines.transformers import TransformersEngine
from rltrain.gateway.completions import DEFAULT_MAX_TOKENS
from rltrain.gateway.schemas import ChatCompletionRequest
from rltrain.recipes import parse_recipe
from rltrain.serving import ServingStack
from rltrain.store import MemoryStore

#: bounds on waits for an event; the tests never assert on time
EVENT_LIMIT_S = 60.0


class ForwardGate:
    """Lets the engine's model run one forward pass (one sampled token) per permit."""

    def __init__(self, engine: TransformersEngine, permits: int) -> None:
        self.permits = threading.Semaphore(permits)
        self.open = False
        self.entered = 0  # forward passes begun, the one waiting for a permit included
        self._forward = engine.model.forward

        def gated(*args: Any, **kwargs: Any) -> Any:
            self.entered += 1
            if not self.open:
                self.permits.acquire(timeout=EVENT_LIMIT_S)
            return self._forward(*args, **kwargs)

        engine.model.forward = gated

    def release(self, n: int = 1) -> None:
        self.permits.release(n)

    def free(self) -> None:
        self.open = True
        self.permits.release(1000)


@contextmanager
def gated(engine: TransformersEngine, permits: int) -> Iterator[ForwardGate]:
    gate = ForwardGate(engine, permits)
    try:
        yield gate
    finally:
        gate.free()
        del engine.model.forward  # back to the class's forward


def _wait_for(condition: Any, what: str) -> None:
    deadline = time.monotonic() + EVENT_LIMIT_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {EVENT_LIMIT_S} s")
        time.sleep(0.01)


def _request(engine: TransformersEngine, **fields: Any) -> dict[str, Any]:
    return {"model": engine.model_name, "messages": QUESTION, "temperature": 1.0, "seed": 11, **fields}


def test_stream_sends_tokens_as_the_engine_samples_them(engine: TransformersEngine) -> None:
    """The first content chunk reaches the client while the engine has sampled at most a few of the request's
    tokens: the engine may run one forward pass ahead of the chunks the client has read."""
    max_tokens = 40
    with serve(engine, MemoryStore()) as served, gated(engine, permits=2) as gate:
        before = engine.stats.generated_tokens
        sampled_at_chunk: list[int] = []
        pieces: list[str] = []
        body = _request(engine, max_tokens=max_tokens, stream=True, stream_options={"include_usage": True})
        usage = None
        with httpx.stream("POST", f"{served.url}/v1/chat/completions", json=body, timeout=EVENT_LIMIT_S) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line.removeprefix("data: "))
                usage = chunk.get("usage") or usage
                content = chunk["choices"][0]["delta"].get("content") if chunk["choices"] else None
                if content:
                    sampled_at_chunk.append(engine.stats.generated_tokens - before)
                    pieces.append(content)
                gate.release()
        gate.free()
        full = httpx.post(f"{served.url}/v1/chat/completions", json=_request(engine, max_tokens=max_tokens),
                          timeout=EVENT_LIMIT_S).json()
    assert usage is not None and usage["completion_tokens"] == max_tokens
    assert "".join(pieces) == full["choices"][0]["message"]["content"], "same seed, same text, streamed or not"
    assert len(pieces) > max_tokens // 2, "streamed about a token a chunk"
    assert sampled_at_chunk[0] <= 3, f"first chunk after {sampled_at_chunk[0]} of {max_tokens} tokens"
    assert sampled_at_chunk == sorted(sampled_at_chunk)
    # the last piece may be held back to the end (a stop string or split character could still change it), and a
    # loaded machine lets the engine run ahead by its permits; most chunks still leave before sampling ends
    assert sum(n < max_tokens for n in sampled_at_chunk) >= len(sampled_at_chunk) // 2, sampled_at_chunk


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_hangs_up_cancels_its_generation(engine: TransformersEngine, stream: bool) -> None:
    """n=4 and a long max_tokens; the client hangs up after the first tokens: the engine drops the 4 rows (it
    samples a few tokens more at most, not the 4 x 1500 asked) and serves the next request."""
    n, max_tokens = 4, 1500
    body = json.dumps(_request(engine, n=n, max_tokens=max_tokens, stream=stream)).encode()
    with serve(engine, MemoryStore()) as served, gated(engine, permits=3) as gate:
        stats = engine.stats
        host, port = served.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=EVENT_LIMIT_S) as client:
            client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            _wait_for(lambda: engine.stats.generated_tokens > stats.generated_tokens, "the first token")
            if stream:
                assert client.recv(65536).startswith(b"HTTP/1.1 200")
        # the client is gone; let the engine run freely: it must notice and stop
        gate.free()
        _wait_for(lambda: engine.stats.cancelled_rows == stats.cancelled_rows + n, "the rows' cancellation")
        sampled = engine.stats.generated_tokens - stats.generated_tokens
        assert sampled < n * 50, f"the engine sampled {sampled} tokens for a client that hung up"
        after = httpx.post(f"{served.url}/v1/chat/completions", json=_request(engine, max_tokens=2), timeout=60)
    assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 2


def test_closing_the_engine_stops_its_batch_and_fails_what_is_queued(tiny_model_dir: Any) -> None:
    """What the serving stack does when a run ends or is interrupted (Ctrl-C, SIGTERM, an error), after the
    gateway has stopped and no caller is left: the batch being decoded stops at its next step and every queued
    request fails, instead of being served first (an interrupted evaluation's queue took minutes to drain)."""
    engine = TransformersEngine.from_pretrained(str(tiny_model_dir), max_batch_size=1)
    prompt = engine.tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True,
                                                  return_dict=False)
    request = GenerationRequest(prompt_ids=prompt, max_tokens=1500, temperature=1.0, seed=11)

    async def interrupted(gate: ForwardGate) -> list[Any]:
        waiting = [asyncio.ensure_future(engine.generate(request)) for _ in range(4)]  # one decoding, 3 queued
        await asyncio.to_thread(_wait_for, lambda: engine.stats.generated_tokens > 0, "the first token")
        closing = asyncio.ensure_future(asyncio.to_thread(engine.close))
        await asyncio.to_thread(_wait_for, lambda: engine._closed, "close()")
        gate.free()
        await closing
        return await asyncio.gather(*waiting, return_exceptions=True)

    with gated(engine, permits=3) as gate:
        outcomes = asyncio.run(interrupted(gate))
    assert [type(outcome) for outcome in outcomes] == [EngineError] * 4
    assert all("is closed" in str(outcome) for outcome in outcomes)
    assert engine.stats.generated_tokens < 50, "closing served the batch or the queue (4 x 1500 tokens asked)"


def test_default_max_tokens_is_bounded(engine: TransformersEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """A request without max_tokens may sample DEFAULT_MAX_TOKENS, not the rest of an 8k context."""
    with serve(engine, MemoryStore()) as served:
        monkeypatch.setattr(engine, "max_context", 8192)
        service = served.service
        request = ChatCompletionRequest.model_validate(_request(engine))
        assert service._max_tokens(request, 100) == DEFAULT_MAX_TOKENS == 1024
        assert service._max_tokens(request, 8000) == 192
        asked = ChatCompletionRequest.model_validate(_request(engine, max_tokens=4000))
        assert service._max_tokens(asked, 100) == 4000


SURROGATE = "\ud800"


@pytest.mark.parametrize("where", ["content", "tool_description", "rltrain_tag", "name", "model"])
def test_a_lone_surrogate_anywhere_is_a_400_naming_the_field(engine: TransformersEngine, where: str) -> None:
    store = MemoryStore()
    start_rollouts(store, ["ro-a"])
    body: dict[str, Any] = _request(engine, max_tokens=2)
    message: dict[str, Any] = {"role": "user", "content": "hi"}
    expected_param = {"content": "messages.0.content", "tool_description": "tools.0.function.description",
                      "rltrain_tag": "rltrain_tag", "name": "messages.0.name", "model": "model"}[where]
    if where == "content":
        message["content"] = f"caf{SURROGATE}"
    elif where == "name":
        message["name"] = SURROGATE
    elif where == "tool_description":
        body["tools"] = [{"type": "function", "function": {"name": "f", "description": SURROGATE}}]
    elif where == "rltrain_tag":
        body["rltrain_tag"] = SURROGATE
    else:
        body["model"] = SURROGATE
    body["messages"] = [message]
    raw = json.dumps(body)  # ensure_ascii: the surrogate travels as the escape \ud800, as JSON allows
    assert "\\ud800" in raw
    with serve(engine, store) as served:
        error = error_of(served.post("/rollouts/ro-a/attempts/1/v1/chat/completions", raw), 400)
    assert error["param"] == expected_param
    assert "lone UTF-16 surrogate" in error["message"]
    assert store.get_spans("ro-a") == []


def test_a_surrogate_pair_is_text(engine: TransformersEngine) -> None:
    store = MemoryStore()
    start_rollouts(store, ["ro-a"])
    raw = json.dumps(_request(engine, max_tokens=2, messages=[{"role": "user", "content": "smile \U0001f600"}]))
    assert "\\ud83d\\ude00" in raw
    with serve(engine, store) as served:
        assert served.post("/rollouts/ro-a/attempts/1/v1/chat/completions", raw).status_code == 200
    [span] = store.get_spans("ro-a")
    assert span.attributes["messages"][0]["content"] == "smile \U0001f600"


def test_the_bearer_scheme_is_read_in_any_case(engine: TransformersEngine) -> None:
    body = _request(engine, max_tokens=1)
    with serve(engine, MemoryStore(), api_key="k3y") as served:
        for header in ("Bearer k3y", "bearer k3y", "BEARER k3y", "bEaReR  k3y"):
            assert served.post("/v1/chat/completions", body, headers={"Authorization": header}).status_code == 200
        for header in ("bearer k3", "Basic k3y", "k3y", "bearer"):
            error_of(served.post("/v1/chat/completions", body, headers={"Authorization": header}), 401)


def _raw_connection(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=EVENT_LIMIT_S)


def _whole_response(client: socket.socket) -> bytes:
    """Headers and the whole body (its Content-Length): one ``recv`` may return the headers alone."""
    answer = b""
    while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < _content_length(answer):
        chunk = client.recv(65536)
        if not chunk:
            break
        answer += chunk
    return answer


def _content_length(answer: bytes) -> int:
    for line in answer.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def test_a_half_sent_body_times_out_with_408(engine: TransformersEngine) -> None:
    with serve(engine, MemoryStore(), body_timeout_s=0.5) as served, _raw_connection(served.url) as client:
        client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: 1000\r\n\r\n{\"model\": ")
        answer = _whole_response(client)
    assert answer.startswith(b"HTTP/1.1 408")
    assert b"request_timeout" in answer


def test_a_client_hanging_up_mid_body_costs_one_log_line(
    engine: TransformersEngine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with serve(engine, MemoryStore()) as served:
        for _ in range(3):
            with _raw_connection(served.url) as client:
                client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                               b"Content-Length: 1000\r\n\r\n{\"model\": ")
        _wait_for(lambda: sum("disconnected before its request body" in r.getMessage() for r in caplog.records) == 3,
                  "the three disconnects being noticed")
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR], "no traceback, no error"


def _streamed_text(url: str, body: dict[str, Any]) -> tuple[str, str | None]:
    pieces, finish = [], None
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                [choice] = json.loads(line.removeprefix("data: "))["choices"]
                pieces.append(choice["delta"].get("content") or "")
                finish = choice["finish_reason"] or finish
    return "".join(pieces), finish


def test_streamed_text_with_stop_strings_and_tools_joins_to_the_served_text(engine: TransformersEngine) -> None:
    """Text held back while a stop string or a tool-call block may begin: the chunks never show text the
    non-streamed answer does not have."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    with serve(engine, MemoryStore()) as served:
        def served_text(**fields: Any) -> tuple[str, str]:
            choice = httpx.post(f"{served.url}/v1/chat/completions", json=_request(engine, **fields),
                                timeout=60).json()["choices"][0]
            return choice["message"]["content"], choice["finish_reason"]

        whole, _ = served_text(max_tokens=24)
        stop = whole[len(whole) // 2: len(whole) // 2 + 3]
        for fields in ({"max_tokens": 24, "stop": [stop]}, {"max_tokens": 24, "tools": tools},
                       {"max_tokens": 24, "tools": tools, "stop": [stop, "zz"]}):
            assert _streamed_text(served.url, _request(engine, **fields)) == served_text(**fields), fields


def test_a_stack_stopped_mid_generation_answers_503_and_logs_no_traceback(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Ctrl-C or SIGTERM mid-evaluation: the serving stack stops while a generation runs for an agent that is gone.
    # The forward pass is held at the gate until the engine is closed, so the generation outlasts the gateway's
    # 10 s grace if the gateway stops first (it then cancels the request: a traceback, and no answer).
    recipe = parse_recipe({"output_dir": str(tmp_path), "model": {"name": str(tiny_model_dir)}})
    stack = ServingStack(recipe, MemoryStore()).start()
    gate = ForwardGate(stack.engine, permits=1)  # the prompt pass runs, the first decode step waits
    close = stack.engine.close

    def close_then_open() -> None:
        gate.free()
        close()

    stack.engine.close = close_then_open  # type: ignore[method-assign]
    answers: list[httpx.Response] = []
    client = threading.Thread(target=lambda: answers.append(httpx.post(
        f"{stack.url}/v1/chat/completions", timeout=EVENT_LIMIT_S,
        json={"model": stack.model_name, "messages": QUESTION, "max_tokens": 8})))
    client.start()
    _wait_for(lambda: gate.entered >= 2, "a decode step waiting at the gate")
    stack.stop()
    client.join(EVENT_LIMIT_S)
    assert [answer.status_code for answer in answers] == [503]
    assert error_of(answers[0], 503)["type"] == "engine_unavailable"
    assert "Exception in ASGI application" not in caplog.text

"""A vLLM-compatible server for CPU tests: the slice of vLLM's OpenAI server that rltrain uses.

It answers like vLLM (``/health``, ``/v1/models`` with ``max_model_len`` and LoRA cards, ``/v1/completions`` with
``token_ids``, ``prompt_token_ids`` and ``logprobs.tokens`` as ``token_id:N``, runtime ``/v1/load_lora_adapter`` /
``/v1/unload_lora_adapter`` with vLLM's error texts), streams like vLLM 0.32 when asked (``stream: true``: one
server-sent chunk per sampled token carrying the choice's ``index``, the new ``token_ids`` and their ``logprobs``,
``prompt_token_ids`` on its first chunk and ``finish_reason`` on its last, then ``data: [DONE]``; a client that
closes the stream aborts the request) and checks the request shape rltrain must send: a token-id prompt, ``logprobs: 0``, ``return_token_ids``, a known model or loaded adapter name. Generation is real: a
(tiny) causal LM samples token by token, and adapters are real PEFT adapters loaded from the path given, so an
adapter changes what is sampled. Logprobs are ``log_softmax(logits / temperature)`` at the sampled token, what
vLLM returns with ``--logprobs-mode processed_logprobs`` and top_p=1, top_k=0. ``gate`` (a semaphore) paces the
sampling: one token per permit, so a test orders events without clocks.

Two ways to run it: in-process (``FakeVLLM(...).app`` under :class:`rltrain.gateway.server.GatewayServer`), or as
a program that takes ``vllm serve``'s arguments (``python tests/fake_vllm.py serve MODEL --port P ...``), which
``engine.vllm.command`` points at in the supervision tests. As a program it obeys: ``FAKE_VLLM_FAIL=exit`` (exit 3
before serving, like a CUDA out-of-memory at load), ``FAKE_VLLM_FAIL=hang`` (never become healthy),
``FAKE_VLLM_EXIT_AFTER=N`` (die without answering on completion request N+1), ``FAKE_VLLM_ARGV_FILE=path`` (write
its argv, its pid and the LoRA environment variable there as JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

UNSERVABLE = {"lm_head", "embed_tokens"}
#: the longest a gated token waits for its permit
GATE_LIMIT_S = 60.0


def error(status: int, message: str, kind: str = "BadRequestError") -> JSONResponse:
    """vLLM's current error body."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": status}}, status)


class FakeVLLM:
    """The server state: model, adapters, requests seen, and scripted failures."""

    def __init__(
        self, model_dir: str | Path, served_name: str, *, enable_lora: bool = True, max_lora_rank: int = 16,
        max_model_len: int | None = None, exit_after: int | None = None,
    ) -> None:
        from transformers import AutoModelForCausalLM

        self.model_dir = str(model_dir)
        self.served_name = served_name
        self.enable_lora = enable_lora
        self.max_lora_rank = max_lora_rank
        self.model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.vocab = self.model.get_input_embeddings().num_embeddings
        self.max_model_len = max_model_len or int(self.model.config.max_position_embeddings)
        self.eos = self.model.config.eos_token_id
        self.exit_after = exit_after
        #: bodies of /v1/completions requests, in arrival order
        self.requests: list[dict[str, Any]] = []
        #: ("load" | "unload", name) in order
        self.lora_calls: list[tuple[str, str]] = []
        #: adapter name -> path
        self.adapters: dict[str, str] = {}
        #: (status, JSON body) answered instead of the next completions instead of sampling
        self.fail_next: list[tuple[int, Any]] = []
        #: when set, sampling a token takes one permit
        self.gate: threading.Semaphore | None = None
        #: tokens sampled so far, all requests
        self.sampled = 0
        #: the count of tokens sampled (``sampled``) when each aborted request (streamed, client gone) stopped
        self.aborted: list[int] = []
        self._aborts = threading.Condition()
        self._lock = threading.Lock()
        self.app = self._build_app()

    # -- sampling -------------------------------------------------------------------------------------------
    @contextmanager
    def _weights(self, name: str) -> Iterator[None]:
        if name == self.served_name:
            with self.model.disable_adapter() if self.adapters else nullcontext():
                yield
        else:
            self.model.set_adapter(name)
            yield

    def _take_permit(self, cancelled: threading.Event | None) -> bool:
        """Wait for the gate's permit to sample one more token (at most ``GATE_LIMIT_S``, so that a test that stops
        releasing cannot hang); False when the request was cancelled meanwhile."""
        deadline = time.monotonic() + GATE_LIMIT_S
        while self.gate is not None and not self.gate.acquire(timeout=0.05) and time.monotonic() < deadline:
            if cancelled is not None and cancelled.is_set():
                return False
        return cancelled is None or not cancelled.is_set()

    def sample(
        self, body: dict[str, Any], on_token: Any = None, cancelled: threading.Event | None = None
    ) -> list[dict[str, Any]]:
        """``n`` completions of the body's prompt with the named weights (one request at a time). Each token goes
        to ``on_token(index, token, logprob, finish_reason or None)`` as it is sampled; sampling stops when
        ``cancelled`` is set."""
        temperature = float(body["temperature"])
        stop = set(body.get("stop_token_ids") or []) | {self.eos}
        seed = body.get("seed")
        choices = []
        with self._lock, torch.no_grad(), self._weights(body["model"]):
            for index in range(int(body.get("n", 1))):
                generator = torch.Generator().manual_seed(seed + index) if seed is not None else torch.Generator()
                if seed is None:
                    generator.seed()
                ids = list(body["prompt"])
                out: list[int] = []
                logprobs: list[float] = []
                finish = "length"
                for step in range(int(body["max_tokens"])):
                    if not self._take_permit(cancelled):
                        with self._aborts:
                            self.aborted.append(self.sampled)
                            self._aborts.notify_all()
                        return choices
                    logits = self.model(torch.tensor([ids])).logits[0, -1].float()
                    scaled = torch.log_softmax(logits / (temperature or 1.0), dim=-1)
                    if temperature == 0:
                        token = int(scaled.argmax())
                    else:
                        token = int(torch.multinomial(scaled.exp(), 1, generator=generator))
                    ids.append(token)
                    out.append(token)
                    logprobs.append(float(scaled[token]))
                    self.sampled += 1
                    ends = "stop" if token in stop else "length" if step == int(body["max_tokens"]) - 1 else None
                    if on_token is not None:
                        on_token(index, token, logprobs[-1], ends)
                    if token in stop:
                        finish = "stop"
                        break
                choices.append({
                    "index": index, "text": "", "finish_reason": finish,
                    "stop_reason": out[-1] if finish == "stop" and out[-1] != self.eos else None,
                    "token_ids": out, "prompt_token_ids": list(body["prompt"]),
                    "logprobs": {"tokens": [f"token_id:{t}" for t in out], "token_logprobs": logprobs,
                                 "top_logprobs": [{f"token_id:{t}": lp} for t, lp in zip(out, logprobs)],
                                 "text_offset": [0] * len(out)},
                })
        return choices

    def wait_aborted(self, count: int, timeout_s: float) -> bool:
        """Wait until ``count`` requests were aborted; False if they were not within ``timeout_s``."""
        with self._aborts:
            return self._aborts.wait_for(lambda: len(self.aborted) >= count, timeout_s)

    def check(self, body: dict[str, Any]) -> JSONResponse | None:
        """vLLM's answer to a request it would refuse, and ours to one rltrain must never send."""
        prompt = body.get("prompt")
        if not isinstance(prompt, list) or not prompt or not all(isinstance(t, int) for t in prompt):
            return error(400, f"fake vLLM: rltrain must send a token-id prompt, got {prompt!r:.80}")
        if min(prompt) < 0 or max(prompt) >= self.vocab:
            return error(400, f"Token id {max(prompt)} is out of vocabulary")
        if body.get("logprobs") != 0 or body.get("return_token_ids") is not True:
            return error(400, "fake vLLM: rltrain must ask for logprobs=0 and return_token_ids=true")
        model = body.get("model")
        if model != self.served_name and model not in self.adapters:
            return error(404, f"The model `{model}` does not exist.", "NotFoundError")
        requested = len(prompt) + int(body.get("max_tokens") or 16)
        if requested > self.max_model_len:
            return error(400, f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                              f"requested {requested} tokens ({len(prompt)} in the messages, "
                              f"{body.get('max_tokens')} in the completion).")
        return None

    async def stream(self, body: dict[str, Any]) -> AsyncIterator[str]:
        """vLLM's streamed completion: a chunk per token as it is sampled; closing the stream aborts sampling."""
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[str | None] = asyncio.Queue()
        cancelled = threading.Event()
        started: set[int] = set()
        request_id, created = f"cmpl-{len(self.requests)}", int(time.time())

        def on_token(index: int, token: int, logprob: float, finish: str | None) -> None:
            choice = {
                "index": index, "text": "",
                "logprobs": {"text_offset": [0], "token_logprobs": [logprob], "tokens": [f"token_id:{token}"],
                             "top_logprobs": [{f"token_id:{token}": logprob}]},
                "finish_reason": finish, "stop_reason": token if finish == "stop" and token != self.eos else None,
                "prompt_token_ids": None if index in started else list(body["prompt"]), "token_ids": [token],
            }
            started.add(index)
            chunk = {"id": request_id, "object": "text_completion", "created": created, "model": body["model"],
                     "choices": [choice]}
            loop.call_soon_threadsafe(chunks.put_nowait, f"data: {json.dumps(chunk)}\n\n")

        work = asyncio.ensure_future(asyncio.to_thread(self.sample, body, on_token, cancelled))
        work.add_done_callback(lambda _: chunks.put_nowait(None))
        try:
            while (chunk := await chunks.get()) is not None:
                yield chunk
            work.result()
            yield "data: [DONE]\n\n"
        finally:
            cancelled.set()  # the client went away (or the stream ended): stop sampling

    # -- adapters ---------------------------------------------------------------------------------------------
    def load(self, name: str, path: str) -> Response:
        if name in self.adapters:
            return error(400, f"The lora adapter '{name}' has already been loaded.", "InvalidUserInput")
        config_file = Path(path) / "adapter_config.json"
        if not config_file.is_file():
            return error(400, f"No adapter found for {path}", "InvalidUserInput")
        config = json.loads(config_file.read_text())
        if int(config["r"]) > self.max_lora_rank:
            return error(400, f"LoRA rank {config['r']} is greater than max_lora_rank {self.max_lora_rank}.")
        if set(config.get("target_modules") or []) & UNSERVABLE:
            return error(400, "embedding and lm_head LoRA modules are not supported")
        from peft import PeftModel

        with self._lock:
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(path, adapter_name=name)
            else:
                self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name).eval()
            self.adapters[name] = path
        self.lora_calls.append(("load", name))
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    def unload(self, name: str) -> Response:
        if name not in self.adapters:
            return error(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
        with self._lock:
            self.model.delete_adapter(name)
            del self.adapters[name]
            if not self.adapters:  # PEFT cannot run a model left without adapters: back to the plain one
                self.model = self.model.unload()
        self.lora_calls.append(("unload", name))
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    # -- HTTP -----------------------------------------------------------------------------------------------
    def _build_app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/health")
        async def health() -> Response:
            return Response(status_code=200)

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            cards = [{"id": self.served_name, "object": "model", "root": self.model_dir, "parent": None,
                      "max_model_len": self.max_model_len}]
            cards += [{"id": name, "object": "model", "root": path, "parent": self.served_name}
                      for name, path in self.adapters.items()]
            return {"object": "list", "data": cards}

        @app.post("/v1/completions")
        async def completions(request: Request) -> Response:
            body = await request.json()
            self.requests.append(body)
            if self.exit_after is not None and len(self.requests) > self.exit_after:
                os._exit(1)  # a crash: no answer, the connection drops
            if self.fail_next:
                status, content = self.fail_next.pop(0)
                if body.get("stream") and status < 400:  # vLLM's answer to a stream it cannot stream: one chunk
                    return StreamingResponse(iter([f"data: {json.dumps(content)}\n\n", "data: [DONE]\n\n"]),
                                             media_type="text/event-stream")
                return JSONResponse(content, status)
            refused = self.check(body)
            if refused is not None:
                return refused
            if body.get("stream"):
                return StreamingResponse(self.stream(body), media_type="text/event-stream")
            choices = await asyncio.to_thread(self.sample, body)
            return JSONResponse({
                "id": f"cmpl-{len(self.requests)}", "object": "text_completion", "created": int(time.time()),
                "model": body["model"], "choices": choices,
                "usage": {"prompt_tokens": len(body["prompt"]),
                          "completion_tokens": sum(len(c["token_ids"]) for c in choices)},
            })

        if self.enable_lora:
            @app.post("/v1/load_lora_adapter")
            async def load_lora(request: Request) -> Response:
                body = await request.json()
                return self.load(body["lora_name"], body["lora_path"])

            @app.post("/v1/unload_lora_adapter")
            async def unload_lora(request: Request) -> Response:
                body = await request.json()
                return self.unload(body["lora_name"])

        return app


def main(argv: list[str]) -> None:
    """``fake_vllm.py serve MODEL [vllm serve options]``: serve until killed (the options vLLM would use are
    honoured, the GPU ones ignored)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["serve"])
    parser.add_argument("model")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name")
    parser.add_argument("--max-model-len", type=int)
    parser.add_argument("--enable-lora", action="store_true")
    parser.add_argument("--max-lora-rank", type=int, default=16)
    args, _ = parser.parse_known_args(argv)
    if os.environ.get("FAKE_VLLM_ARGV_FILE"):
        Path(os.environ["FAKE_VLLM_ARGV_FILE"]).write_text(json.dumps({
            "argv": argv, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING"),
            "pid": os.getpid(),
        }))
    failure = os.environ.get("FAKE_VLLM_FAIL")
    if failure == "exit":
        print("RuntimeError: CUDA out of memory while loading the model (fake)", flush=True)
        sys.exit(3)
    if failure == "hang":
        time.sleep(3600)
    import uvicorn

    torch.set_num_threads(1)
    exit_after = os.environ.get("FAKE_VLLM_EXIT_AFTER")
    # Runtime LoRA routes exist only with --enable-lora and the environment variable, as in vLLM.
    lora = args.enable_lora and os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").lower() in ("1", "true")
    fake = FakeVLLM(args.model, args.served_model_name or args.model, enable_lora=lora,
                    max_lora_rank=args.max_lora_rank, max_model_len=args.max_model_len,
                    exit_after=int(exit_after) if exit_after else None)
    uvicorn.run(fake.app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main(sys.argv[1:])

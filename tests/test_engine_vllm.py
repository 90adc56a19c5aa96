"""The vLLM engine on CPU: the launch command built from a recipe, the requests it sends to a vLLM-compatible
server (``tests/fake_vllm.py``: vLLM's API shape and checks, a real tiny model, real PEFT adapters), its handling
of answers and errors, adapter routing, and the supervision of a server process it starts (the fake run as the
`vllm` program).
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from adapter_sync import make_adapter
from fake_vllm import FakeVLLM

from rltrain.engines import vllm_server
from rltrain.engines.base import ContextLengthError, EngineError, GenerationRequest, GenerationResult, OnToken
from rltrain.engines.vllm import VLLMEngine, VLLMProtocolError, VLLMRequestError
from rltrain.engines.vllm_server import (
    VLLMPortTakenError,
    VLLMServer,
    VLLMStartupError,
    build_vllm_command,
    free_port,
    listening_pids,
    vllm_environment,
)
from rltrain.gateway.app import create_app
from rltrain.gateway.server import GatewayServer
from rltrain.recipes import Recipe, load_recipe, parse_recipe
from rltrain.store.memory import MemoryStore
from rltrain.types import LLMCallRecord, Rollout, SpanKind, Task

FAKE = Path(__file__).with_name("fake_vllm.py")
QWEN_RECIPE = Path(__file__).parents[1] / "recipes" / "room_selection_grpo_qwen.yaml"
PROMPT = [1, 504, 2282, 28, 940, 198]
#: bounds on waits for an event; the tests never assert on time
EVENT_LIMIT_S = 60.0


def vllm_recipe(tmp_path: Path, model_dir: Path, **vllm: Any) -> Recipe:
    return parse_recipe({
        "name": "vllm-test", "output_dir": str(tmp_path), "model": {"name": str(model_dir)},
        "engine": {"kind": "vllm", "vllm": {"startup_timeout_s": 60, "request_timeout_s": 60, **vllm}},
    })


def generate(engine: VLLMEngine, on_token: OnToken | None = None, **fields: Any) -> GenerationResult:
    request = GenerationRequest(**{"prompt_ids": PROMPT, "max_tokens": 5, **fields})
    return asyncio.run(engine.generate(request, on_token=on_token))


# -- the launch command ---------------------------------------------------------------------------------------
def test_launch_command_is_built_from_the_recipe() -> None:
    recipe = load_recipe(QWEN_RECIPE)
    command = build_vllm_command(recipe, "/models/qwen", 8123)
    assert command == [
        *recipe.engine.vllm.program(), "serve", "/models/qwen", "--served-model-name", "Qwen/Qwen2.5-0.5B-Instruct",
        "--host", "127.0.0.1", "--port", "8123", "--dtype", "bfloat16", "--gpu-memory-utilization", "0.3",
        "--tensor-parallel-size", "1", "--seed", "0", "--generation-config", "vllm",
        "--logprobs-mode", "processed_logprobs", "--max-model-len", "8192",
        "--enable-lora", "--max-lora-rank", "16",
    ]
    assert vllm_environment(recipe, {})["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"

    merged = load_recipe(QWEN_RECIPE, [
        "engine.vllm.weight_sync=merged", "engine.vllm.command=/opt/vllm/bin/vllm --verbose",
        "engine.vllm.tensor_parallel_size=2", "engine.vllm.dtype=float16", "engine.vllm.max_model_len=null",
        "engine.vllm.extra_args=[--enforce-eager]",
    ])
    command = build_vllm_command(merged, "/m", 9000)
    assert command[:4] == ["/opt/vllm/bin/vllm", "--verbose", "serve", "/m"]
    assert "--enable-lora" not in command and "--max-model-len" not in command
    assert command[command.index("--weight-transfer-config") + 1] == '{"backend": "nccl"}'
    assert command[command.index("--tensor-parallel-size") + 1] == "2"
    assert command[command.index("--dtype") + 1] == "float16"
    assert command[-1] == "--enforce-eager"
    assert vllm_environment(merged, {}) == {"VLLM_SERVER_DEV_MODE": "1"}


def test_cpu_servers_get_a_bounded_kv_cache_and_no_chunked_prefill(tmp_path: Path) -> None:
    recipe = parse_recipe({"name": "cpu", "output_dir": str(tmp_path),
                           "engine": {"kind": "vllm", "vllm": {"cpu_kv_cache_gib": 3}}})
    assert "--no-enable-chunked-prefill" in build_vllm_command(recipe, "/m", 9000)
    assert vllm_environment(recipe, {})["VLLM_CPU_KVCACHE_SPACE"] == "3"
    gpu = load_recipe(QWEN_RECIPE)  # model.device cuda: chunked prefill stays, the CPU variable is not set
    assert "--no-enable-chunked-prefill" not in build_vllm_command(gpu, "/m", 9000)
    assert "VLLM_CPU_KVCACHE_SPACE" not in vllm_environment(gpu, {})


def test_vllm_program_is_the_checkouts_venv_when_present(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rltrain import recipes

    program = tmp_path / ".venv-vllm" / "bin" / "vllm"
    monkeypatch.setattr(recipes, "CHECKOUT_VLLM", program)
    config = recipes.VLLMConfig()
    assert config.program() == ["vllm"]  # not installed in the checkout: PATH
    program.parent.mkdir(parents=True)
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    assert config.program() == [str(program)] and config.installed()
    assert recipes.VLLMConfig(command="/opt/v/bin/vllm --x").program() == ["/opt/v/bin/vllm", "--x"]


@pytest.mark.parametrize("installed", [True, False])
def test_engine_auto_is_vllm_only_when_installed_and_servable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, installed: bool
) -> None:
    from rltrain import recipes

    program = tmp_path / "vllm"
    if installed:
        program.write_text("#!/bin/sh\n")
        program.chmod(0o755)
    monkeypatch.setattr(recipes, "CHECKOUT_VLLM", program)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    recipe = parse_recipe({"name": "a", "output_dir": str(tmp_path), "engine": {"kind": "auto"}})
    assert recipe.engine.kind == ("vllm" if installed else "transformers")
    # a LoRA rank above what vLLM loads keeps the embedded engine rather than failing the recipe
    too_big = parse_recipe({
        "name": "a", "output_dir": str(tmp_path), "engine": {"kind": "auto", "vllm": {"max_lora_rank": 8}},
        "algorithm": {"name": "grpo", "lora": {"r": 16}},
    })
    assert too_big.engine.kind == "transformers"


def test_module_prints_the_command_the_engine_runs(tmp_path: Path, tiny_model_dir: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "rltrain.engines.vllm_server", str(QWEN_RECIPE), "--print", "--port", "8200",
         "--set", f"model.name={tiny_model_dir}"],
        capture_output=True, text=True, check=True, env={**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": ""},
    ).stdout
    recipe = load_recipe(QWEN_RECIPE, [f"model.name={tiny_model_dir}"])
    assert out.strip() == "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True " + shlex.join(
        build_vllm_command(recipe, tiny_model_dir, 8200))


# -- requests and answers, against an in-process vLLM-compatible server ------------------------------------------
@pytest.fixture(scope="module")
def fake(tiny_model_dir: Path) -> Iterator[tuple[FakeVLLM, str]]:
    server = FakeVLLM(tiny_model_dir, str(tiny_model_dir), max_lora_rank=16)
    with GatewayServer(server.app) as http:
        yield server, http.base_url


@pytest.fixture
def engine(fake: tuple[FakeVLLM, str], tmp_path: Path, tiny_model_dir: Path) -> Iterator[VLLMEngine]:
    server, url = fake
    server.fail_next.clear()
    server.gate = None
    engine = VLLMEngine.from_recipe(vllm_recipe(tmp_path, tiny_model_dir, url=url))
    yield engine
    for version in engine.loaded_versions:  # leave the shared server without this test's adapters
        server.unload(f"policy-v{version}")
    engine.close()


def test_request_shape_and_result(engine: VLLMEngine, fake: tuple[FakeVLLM, str]) -> None:
    server, _ = fake
    assert engine.max_context == 2048 and engine.served_name == engine.model_name
    result = generate(engine, temperature=0.7, top_p=1.0, n=3, seed=11, stop_token_ids=(2,), max_tokens=6)
    body = server.requests[-1]
    assert body["prompt"] == PROMPT and body["model"] == engine.served_name
    assert body["logprobs"] == 0 and body["return_token_ids"] is True and body["return_tokens_as_token_ids"] is True
    assert body["n"] == 3 and body["seed"] == 11 and body["stop_token_ids"] == [2] and body["max_tokens"] == 6
    # every sampling parameter explicit: the model's generation_config must not change the distribution
    assert (body["top_k"], body["min_p"], body["repetition_penalty"]) == (0, 0.0, 1.0)
    assert (body["presence_penalty"], body["frequency_penalty"], body["temperature"]) == (0.0, 0.0, 0.7)
    assert len(result.completions) == 3 and result.policy_version == 0
    for completion in result.completions:
        assert len(completion.completion_ids) == len(completion.logprobs) >= 1
        assert all(lp <= 0 for lp in completion.logprobs)
        if completion.finish_reason == "stop":  # the stop token is part of the completion, as sampled
            assert completion.completion_ids[-1] in (2, engine.tokenizer.eos_token_id)
        else:
            assert len(completion.completion_ids) == 6
    again = generate(engine, temperature=0.7, n=3, seed=11, stop_token_ids=(2,), max_tokens=6)
    assert [c.completion_ids for c in again.completions] == [c.completion_ids for c in result.completions]


def test_gateway_records_exactly_what_vllm_sampled(engine: VLLMEngine, fake: tuple[FakeVLLM, str]) -> None:
    server, _ = fake
    store = MemoryStore()
    store.enqueue_rollouts([Rollout(rollout_id="ro-v", task=Task(id="t", payload={}))])
    assert store.claim_rollout("worker") is not None
    with GatewayServer(create_app(engine, store)) as gateway:
        client = openai.OpenAI(base_url=f"{gateway.base_url}/rollouts/ro-v/v1", api_key="x", max_retries=0)
        reply = client.chat.completions.create(
            model=engine.model_name, messages=[{"role": "user", "content": "Pick a room."}], max_tokens=5,
            temperature=1.0, seed=3,
        )
    [span] = store.get_spans("ro-v")
    assert span.kind == SpanKind.LLM
    record = LLMCallRecord.model_validate(span.attributes)
    body = server.requests[-1]
    sampled = server.sample(body)[0]  # the same seed samples the same tokens again
    assert record.prompt_ids == body["prompt"]
    assert record.completion_ids == sampled["token_ids"] and record.logprobs == sampled["logprobs"]["token_logprobs"]
    assert record.policy_version == 0 and reply.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize(("status", "body", "error", "text"), [
    (500, {"error": {"message": "CUDA error: device-side assert", "type": "InternalServerError", "code": 500}},
     EngineError, "CUDA error"),
    (400, {"object": "error", "message": "top_p must be in (0, 1]", "type": "BadRequestError", "code": 400},
     VLLMRequestError, "top_p must be in"),
    (400, {"error": {"message": "This model's maximum context length is 2048 tokens. However, you requested 3000",
                     "type": "BadRequestError", "code": 400}}, ContextLengthError, "maximum context length"),
])
def test_error_answers_become_engine_errors(
    engine: VLLMEngine, fake: tuple[FakeVLLM, str], status: int, body: dict[str, Any], error: type, text: str,
) -> None:
    fake[0].fail_next.append((status, body))
    with pytest.raises(error, match=text) as raised:
        generate(engine)
    assert isinstance(raised.value, ValueError) == (status < 500)  # 4xx: the gateway answers 400, else 503


def _choice(**fields: Any) -> dict[str, Any]:
    choice = {"index": 0, "text": "", "finish_reason": "length", "token_ids": [5, 6],
              "prompt_token_ids": PROMPT,
              "logprobs": {"tokens": ["token_id:5", "token_id:6"], "token_logprobs": [-0.5, -1.0]}}
    return {**choice, **fields}


@pytest.mark.parametrize(("choice", "text"), [
    (_choice(logprobs={"tokens": ["token_id:5", "token_id:6"], "token_logprobs": [-0.5]}), "2 token ids but 1"),
    (_choice(logprobs={"tokens": ["token_id:5", "token_id:7"], "token_logprobs": [-0.5, -1.0]}), "disagree"),
    (_choice(prompt_token_ids=PROMPT[1:]), "not the 6 token ids sent"),
    (_choice(logprobs=None), "no logprobs"),
    (_choice(token_ids=None, logprobs={"tokens": ["a", "b"], "token_logprobs": [-0.5, -1.0]}), "neither token_ids"),
    (_choice(logprobs={"tokens": ["token_id:5", "token_id:6"], "token_logprobs": [-0.5, None]}), "NaN"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_malformed_answers_are_refused(
    engine: VLLMEngine, fake: tuple[FakeVLLM, str], choice: dict[str, Any], text: str, stream: bool
) -> None:
    """Streamed, the same answer arrives as one chunk (as vLLM sends a completion it cannot stream)."""
    fake[0].fail_next.append((200, {"choices": [choice]}))
    reported: list[int] = []
    with pytest.raises(VLLMProtocolError, match=text):
        generate(engine, on_token=(lambda i, token, lp: reported.append(token)) if stream else None)
    assert reported == [], "a malformed chunk's tokens are not passed on"


def test_aborted_completion_is_an_engine_failure(engine: VLLMEngine, fake: tuple[FakeVLLM, str]) -> None:
    fake[0].fail_next.append((200, {"choices": [_choice(finish_reason="abort")]}))
    with pytest.raises(EngineError, match="finish_reason='abort'") as raised:
        generate(engine)
    assert not isinstance(raised.value, ValueError)


# -- streaming ------------------------------------------------------------------------------------------------
def test_stream_reports_each_token_before_vllm_samples_the_next(
    engine: VLLMEngine, fake: tuple[FakeVLLM, str]
) -> None:
    """With ``on_token`` the engine asks vLLM for a stream and reports each token as its chunk arrives: the fake
    samples one token per permit and the callback gives the next permit, so token k is reported after exactly k
    tokens were sampled, before the completion ends. The result is the non-streamed one, token for token."""
    server, _ = fake
    fields = {"temperature": 1.0, "n": 2, "seed": 7, "max_tokens": 12}
    reported: list[tuple[int, int, float]] = []
    sampled_at: list[int] = []

    def on_token(index: int, token: int, logprob: float) -> None:
        reported.append((index, token, logprob))
        sampled_at.append(server.sampled - before)
        server.gate.release()  # type: ignore[union-attr]

    server.gate = threading.Semaphore(1)
    before = server.sampled
    streamed = generate(engine, on_token=on_token, **fields)
    assert server.requests[-1]["stream"] is True
    server.gate = None
    whole = generate(engine, **fields)
    assert "stream" not in server.requests[-1]
    assert streamed.completions == whole.completions  # same ids, logprobs and finish reasons
    for index, completion in enumerate(streamed.completions):
        assert [(t, lp) for i, t, lp in reported if i == index] == list(
            zip(completion.completion_ids, completion.logprobs, strict=True))
    total = sum(len(c.completion_ids) for c in streamed.completions)
    assert sampled_at == list(range(1, total + 1)), "each token reported before the next one was sampled"


def test_streamed_chat_through_the_gateway_joins_to_the_non_streamed_text(
    engine: VLLMEngine, fake: tuple[FakeVLLM, str]
) -> None:
    """An ``openai``-style ``stream: true`` chat request on the vLLM engine: content chunks leave the gateway while
    vLLM is still sampling (the fake samples a token per chunk the client reads), and join to the text the same
    seeded request gets whole."""
    server, _ = fake
    max_tokens = 30
    body = {"model": engine.model_name, "messages": [{"role": "user", "content": "Pick a room."}],
            "temperature": 1.0, "seed": 11, "max_tokens": max_tokens}
    with GatewayServer(create_app(engine, MemoryStore())) as gateway:
        server.gate = threading.Semaphore(2)
        before = server.sampled
        pieces: list[str] = []
        sampled_at_chunk: list[int] = []
        with httpx.stream("POST", f"{gateway.base_url}/v1/chat/completions", json={**body, "stream": True},
                          timeout=EVENT_LIMIT_S) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line.removeprefix("data: "))
                    content = chunk["choices"][0]["delta"].get("content") if chunk["choices"] else None
                    if content:
                        pieces.append(content)
                        sampled_at_chunk.append(server.sampled - before)
                server.gate.release()
        server.gate = None
        whole = httpx.post(f"{gateway.base_url}/v1/chat/completions", json=body, timeout=EVENT_LIMIT_S).json()
    assert "".join(pieces) == whole["choices"][0]["message"]["content"], "same seed, same text, streamed or not"
    assert len(pieces) > 1 and sampled_at_chunk == sorted(sampled_at_chunk)
    assert sampled_at_chunk[0] <= 4 < max_tokens, f"first chunk after {sampled_at_chunk[0]} of {max_tokens} tokens"


def test_closing_the_stream_aborts_vllms_request(engine: VLLMEngine, fake: tuple[FakeVLLM, str]) -> None:
    """The caller is cancelled after the first token (the gateway's client hung up): the engine closes the stream
    and vLLM stops sampling. The fake samples only while the test gives permits, so without the abort it would
    wait for permits that never come."""
    server, _ = fake
    server.gate = threading.Semaphore(2)
    aborted = len(server.aborted)

    async def hang_up_after_the_first_token() -> None:
        first = asyncio.Event()
        request = GenerationRequest(prompt_ids=PROMPT, max_tokens=1000, temperature=1.0)
        work = asyncio.ensure_future(engine.generate(request, on_token=lambda i, t, lp: first.set()))
        await asyncio.wait_for(first.wait(), EVENT_LIMIT_S)
        work.cancel()
        with pytest.raises(asyncio.CancelledError):
            await work

    before = server.sampled
    asyncio.run(hang_up_after_the_first_token())
    assert server.wait_aborted(aborted + 1, EVENT_LIMIT_S), f"vLLM did not abort within {EVENT_LIMIT_S} s"
    assert server.aborted[-1] - before <= 2, "the request stopped at the tokens it had permits for"
    server.gate = None
    assert len(generate(engine, max_tokens=3).completions[0].completion_ids) >= 1  # the server serves on


def test_a_stream_that_breaks_after_tokens_went_out_is_not_retried(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A supervised server dies mid-stream: the tokens already passed on cannot be taken back, so the request
    fails (a retry would sample different ones), and the server is restarted for the next request."""
    script = tmp_path / "dies_mid_stream.py"
    script.write_text(DIES_MID_STREAM.format(fake=str(FAKE.parent)))
    recipe = vllm_recipe(tmp_path, tiny_model_dir, command=f"{sys.executable} {script}", max_restarts=1)
    engine = VLLMEngine.from_recipe(recipe)
    try:
        assert engine.server is not None
        reported: list[int] = []
        with pytest.raises(EngineError, match=r"the stream broke after 2 token\(s\).*not retried"):
            generate(engine, on_token=lambda i, token, lp: reported.append(token), max_tokens=8)
        assert len(reported) == 2
        assert engine.server.restarts == 1
        # the restarted server (it dies on its first stream again) serves a request that is not streamed
        assert len(generate(engine, max_tokens=3).completions[0].completion_ids) >= 1
    finally:
        engine.close()


#: the fake as a program that dies (the process exits) in a stream, once two chunks went out
DIES_MID_STREAM = """
import os, sys
sys.path.insert(0, {fake!r})
import fake_vllm

stream = fake_vllm.FakeVLLM.stream

async def dying(self, body):
    sent = 0
    async for chunk in stream(self, body):
        if sent == 2:
            os._exit(1)
        yield chunk
        sent += 1

fake_vllm.FakeVLLM.stream = dying
fake_vllm.main(sys.argv[1:])
"""


def test_ids_come_from_logprob_tokens_on_servers_without_return_token_ids(
    engine: VLLMEngine, fake: tuple[FakeVLLM, str]
) -> None:
    fake[0].fail_next.append((200, {"choices": [_choice(token_ids=None)]}))
    [completion] = generate(engine).completions
    assert completion.completion_ids == [5, 6] and completion.logprobs == [-0.5, -1.0]


def test_context_overflow_is_caught_before_sending(engine: VLLMEngine, fake: tuple[FakeVLLM, str]) -> None:
    sent = len(fake[0].requests)
    with pytest.raises(ContextLengthError, match="exceeds the context of 2048"):
        generate(engine, max_tokens=2048)
    assert len(fake[0].requests) == sent


def test_adapter_versions_are_hot_loaded_and_routed(
    engine: VLLMEngine, fake: tuple[FakeVLLM, str], tiny_model_dir: Path, tmp_path: Path
) -> None:
    server, _ = fake
    base = generate(engine, temperature=0.0, max_tokens=8).completions[0].completion_ids
    engine.load_adapter(1, make_adapter(tiny_model_dir, tmp_path / "a1", seed=1))
    engine.set_policy_version(1)
    first = generate(engine, temperature=0.0, max_tokens=8)
    assert server.requests[-1]["model"] == "policy-v1" and first.policy_version == 1
    engine.load_adapter(2, make_adapter(tiny_model_dir, tmp_path / "a2", seed=2))
    assert generate(engine, temperature=0.0, max_tokens=8).policy_version == 1  # loading does not switch
    engine.set_policy_version(2)
    second = generate(engine, temperature=0.0, max_tokens=8)
    assert server.requests[-1]["model"] == "policy-v2" and second.policy_version == 2
    assert len({tuple(base), tuple(first.completions[0].completion_ids), tuple(second.completions[0].completion_ids)}
               ) == 3, "each adapter version must change what is sampled"
    # an explicit older version is served while it is loaded, refused once unloaded
    assert generate(engine, temperature=0.0, max_tokens=8, adapter="policy-v1").completions[0].completion_ids == \
        first.completions[0].completion_ids
    engine.unload_adapter(1)
    assert server.lora_calls[-3:] == [("load", "policy-v1"), ("load", "policy-v2"), ("unload", "policy-v1")]
    sent = len(server.requests)
    with pytest.raises(VLLMRequestError, match="policy-v1 is not loaded"):
        generate(engine, adapter="policy-v1")
    with pytest.raises(VLLMRequestError, match="policy-v5 is not loaded"):
        engine.set_policy_version(5)
    with pytest.raises(VLLMRequestError, match="is the version being served"):
        engine.unload_adapter(2)
    assert len(server.requests) == sent
    with pytest.raises(VLLMRequestError, match="greater than max_lora_rank 16"):
        engine.load_adapter(3, make_adapter(tiny_model_dir, tmp_path / "a3", seed=3, r=32))
    assert engine.loaded_versions == [2]


def test_server_without_runtime_lora_is_named(tiny_model_dir: Path, tmp_path: Path) -> None:
    server = FakeVLLM(tiny_model_dir, str(tiny_model_dir), enable_lora=False)
    with GatewayServer(server.app) as http:
        engine = VLLMEngine.from_recipe(vllm_recipe(tmp_path, tiny_model_dir, url=http.base_url))
        try:
            with pytest.raises(VLLMRequestError, match="VLLM_ALLOW_RUNTIME_LORA_UPDATING"):
                engine.load_adapter(1, tmp_path)
        finally:
            engine.close()


def test_unreachable_external_server_fails_clearly(tiny_model_dir: Path, tmp_path: Path) -> None:
    recipe = vllm_recipe(tmp_path, tiny_model_dir, url=f"http://127.0.0.1:{free_port()}", startup_timeout_s=1)
    with pytest.raises(EngineError, match="did not answer /health within 1 s"):
        VLLMEngine.from_recipe(recipe)


# -- a server process that rltrain starts ---------------------------------------------------------------------
def fake_command() -> str:
    return f"{shlex.quote(sys.executable)} {shlex.quote(str(FAKE))}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_started_server_is_supervised_and_stopped(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv_file = tmp_path / "argv.json"
    monkeypatch.setenv("FAKE_VLLM_ARGV_FILE", str(argv_file))
    monkeypatch.setenv("FAKE_VLLM_EXIT_AFTER", "1")
    recipe = vllm_recipe(tmp_path, tiny_model_dir, command=fake_command(), max_restarts=1)
    engine = VLLMEngine.from_recipe(recipe)
    server = engine.server
    assert server is not None and server.alive
    launched = json.loads(argv_file.read_text())
    assert launched["argv"] == build_vllm_command(recipe, tiny_model_dir, int(server.base_url.rsplit(":", 1)[1]))[2:]
    assert launched["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    try:
        engine.load_adapter(1, make_adapter(tiny_model_dir, tmp_path / "a1", seed=1))
        engine.set_policy_version(1)
        first = generate(engine, temperature=0.0)
        # the server dies on the next request: it is restarted, the adapter loaded again, the request retried
        first_pid = server.pid
        again = generate(engine, temperature=0.0)
        assert server.restarts == 1 and server.pid != first_pid and not pid_alive(first_pid)
        assert again.completions[0].completion_ids == first.completions[0].completion_ids
        assert again.policy_version == 1
        # and dies again: no restarts left, so the error says why and where to look
        with pytest.raises(EngineError, match=r"(?s)exit status 1.*vllm\.log"):
            generate(engine, temperature=0.0)
    finally:
        engine.close()
    assert not server.alive and not pid_alive(server.pid)
    assert "rltrain starts" in (tmp_path / "vllm-test" / "vllm.log").read_text()


def test_server_that_dies_while_starting_is_reported(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_VLLM_FAIL", "exit")
    with pytest.raises(VLLMStartupError, match=r"(?s)exited while starting.*exit status 3.*CUDA out of memory"):
        VLLMEngine.from_recipe(vllm_recipe(tmp_path, tiny_model_dir, command=fake_command()))


def test_server_that_never_gets_healthy_is_stopped(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_VLLM_FAIL", "hang")
    recipe = vllm_recipe(tmp_path, tiny_model_dir, command=fake_command())
    port = free_port()
    server = VLLMServer(build_vllm_command(recipe, tiny_model_dir, port), vllm_environment(recipe),
                        base_url=f"http://127.0.0.1:{port}", log_path=tmp_path / "vllm.log", startup_timeout_s=2,
                        max_restarts=0)
    with pytest.raises(VLLMStartupError, match="did not answer /health within engine.vllm.startup_timeout_s=2 s"):
        server.start()
    assert not server.alive and server.pid is not None and not pid_alive(server.pid)


def test_a_port_another_server_took_is_refused_then_another_port_is_tried(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The race CI met: the port rltrain found free was bound by another test's server before vLLM bound it, and
    that stranger's /health made the dying server look started (its requests then went to the stranger)."""
    monkeypatch.setenv("FAKE_VLLM_FAIL", "hang")  # the started process never binds: only the stranger answers
    with GatewayServer(FakeVLLM(tiny_model_dir, "another-model").app) as stranger:
        taken = int(stranger.base_url.rsplit(":", 1)[1])
        assert listening_pids(taken) == {os.getpid()}
        recipe = vllm_recipe(tmp_path, tiny_model_dir, command=fake_command())
        server = VLLMServer(build_vllm_command(recipe, tiny_model_dir, taken), vllm_environment(recipe),
                            base_url=stranger.base_url, log_path=tmp_path / "vllm.log", startup_timeout_s=60,
                            max_restarts=0)
        with pytest.raises(VLLMPortTakenError, match=rf"port {taken} .* held by another process \(pid {os.getpid()}\)"):
            server.start()
        assert not server.alive and not pid_alive(server.pid)
        # a port the recipe names is not changed behind the user's back
        with pytest.raises(VLLMPortTakenError, match="set engine.vllm.port to a free port"):
            VLLMEngine.from_recipe(vllm_recipe(tmp_path, tiny_model_dir, command=fake_command(), port=taken))
        # a port rltrain picked is picked again: the race replayed, the stranger's port comes first
        monkeypatch.delenv("FAKE_VLLM_FAIL")
        picks = iter([taken])
        monkeypatch.setattr(vllm_server, "free_port", lambda: next(picks, None) or free_port())
        engine = VLLMEngine.from_recipe(vllm_recipe(tmp_path, tiny_model_dir, command=fake_command()))
        try:
            assert engine.server is not None and engine.server.base_url != stranger.base_url
            assert engine.served_name == str(tiny_model_dir)  # not the stranger's "another-model"
            assert listening_pids(int(engine.server.base_url.rsplit(":", 1)[1])) == {engine.server.pid}
        finally:
            engine.close()
    assert f"port {taken}" in caplog.text and "trying another port" in caplog.text


def test_missing_vllm_program_is_named(tiny_model_dir: Path, tmp_path: Path) -> None:
    recipe = vllm_recipe(tmp_path, tiny_model_dir, command="/nonexistent/vllm")
    with pytest.raises(VLLMStartupError, match="engine.vllm.command: '/nonexistent/vllm' was not found"):
        VLLMEngine.from_recipe(recipe)


def test_every_training_process_starting_its_own_server_is_refused(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rltrain.engines.vllm import VLLMConfigError

    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(VLLMConfigError, match="one of 4 training processes"):
        VLLMEngine.from_recipe(vllm_recipe(tmp_path, tiny_model_dir, command=fake_command()))

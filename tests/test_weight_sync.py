"""Weight sync with vLLM on CPU: the recipe checks of what vLLM can serve, the distributed layouts adapter sync can
follow, and GRPO end to end through a vLLM-compatible server (``tests/fake_vllm.py``, real tiny model and real
PEFT adapters): an adapter version per optimiser step, the agents routed to the newest, older versions unloaded,
and TRL's importance-sampling correction switched on and logged.
"""

from __future__ import annotations

import functools
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from adapter_sync import two_synced_steps
from even_length_env import EvenLengthEnv
from fake_vllm import FakeVLLM
from safetensors.torch import load_file

from rltrain import envs
from rltrain.algorithms.vllm_checks import WeightSyncError, adapter_problems, check_adapter_sync_layout
from rltrain.gateway.server import GatewayServer
from rltrain.recipes import RecipeError, parse_recipe
from rltrain.serving import ServingStack
from rltrain.store.memory import MemoryStore
from rltrain.trainer import Trainer

ROOT = Path(__file__).parents[1]


# -- what vLLM can serve, checked when the recipe is read --------------------------------------------------------
def vllm_recipe_data(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "engine": {"kind": "vllm", "vllm": {"max_lora_rank": 16}},
        "algorithm": {"name": "grpo", "lora": {"r": 16, "target_modules": "all-linear"}},
        "sampling": {"train": {"temperature": 1.0, "top_p": 1.0}},
    }
    for path, value in changes.items():
        *parents, key = path.split("__")
        node = data
        for parent in parents:
            node = node.setdefault(parent, {})
        node[key] = value
    return data


@pytest.mark.parametrize(("changes", "message"), [
    ({"algorithm__lora__r": 32}, "algorithm.lora.r=32 exceeds engine.vllm.max_lora_rank=16"),
    ({"algorithm__lora__target_modules": ["q_proj", "lm_head"]}, "target_modules includes ['lm_head']"),
    ({"algorithm__lora__target_modules": ["q_proj", "model.embed_tokens"]}, "includes ['model.embed_tokens']"),
    ({"sampling__train__top_p": 0.9}, "sampling.train.top_p=0.9 must be 1.0"),
    ({"engine__vllm__weight_sync": "merged", "warm_start": {"sources": ["teacher"]}}, "weight_sync=merged"),
    ({"engine__vllm__weight_sync": "merged", "algorithm": {"name": "sft"}}, "weight_sync=merged"),
    ({"engine__vllm__max_lora_rank": 24}, "max_lora_rank: Input should be 1, 8, 16, 32"),
])
def test_what_vllm_cannot_serve_fails_when_the_recipe_is_read(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(RecipeError, match=f"^bad.yaml: .*{re.escape(message)}"):
        parse_recipe(vllm_recipe_data(**changes), "bad.yaml")


@pytest.mark.parametrize("changes", [
    {"algorithm__lora__r": 32, "engine__vllm__max_lora_rank": 32},
    {"engine__kind": "transformers", "algorithm__lora__r": 64, "algorithm__lora__target_modules": ["lm_head"],
     "sampling__train__top_p": 0.9},
    {"engine__vllm__weight_sync": "merged"},
    {"engine__vllm__weight_sync": "merged", "algorithm": None},
])
def test_what_vllm_can_serve_passes(changes: dict[str, Any]) -> None:
    parse_recipe(vllm_recipe_data(**changes), "good.yaml")


def test_saved_adapter_is_checked_as_vllm_reads_it(tiny_model_dir: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=8, target_modules=["q_proj", "lm_head"]))
    model.save_pretrained(tmp_path)
    problems = adapter_problems(tmp_path, max_lora_rank=1)
    assert len(problems) == 2
    assert "r=8 exceeds engine.vllm.max_lora_rank=1" in problems[0] and "['lm_head']" in problems[1]
    assert adapter_problems(tmp_path, max_lora_rank=8)[0].endswith("leaves lm_head out)")


@pytest.mark.parametrize(("config", "refused"), [("zero2", None), ("zero3", "DeepSpeed ZeRO-3"), ("fsdp", "FSDP")])
def test_adapter_sync_follows_the_accelerate_layouts_it_can(config: str, refused: str | None) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    loaded = load_config_from_file(str(ROOT / "recipes" / "accelerate" / f"{config}.yaml"))
    zero_stage = (loaded.deepspeed_config or {}).get("zero_stage")
    if refused is None:
        check_adapter_sync_layout(loaded.distributed_type.value, zero_stage)
    else:
        with pytest.raises(WeightSyncError, match=f"{refused} shards the LoRA weights.*weight_sync: merged"):
            check_adapter_sync_layout(loaded.distributed_type.value, zero_stage)


def test_gpu_scripts_parse() -> None:
    for script in sorted((ROOT / "scripts").glob("*.sh")):
        subprocess.run(["bash", "-n", str(script)], check=True)


# -- GRPO through a vLLM-compatible server ----------------------------------------------------------------------
@pytest.fixture(autouse=True)
def parity_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(envs._REGISTRY, "parity", functools.partial(EvenLengthEnv, n_tasks=6))


@pytest.fixture
def fake(tiny_model_dir: Path) -> Iterator[tuple[FakeVLLM, str]]:
    server = FakeVLLM(tiny_model_dir, str(tiny_model_dir), max_lora_rank=8)
    with GatewayServer(server.app) as http:
        yield server, http.base_url


def grpo_recipe(tmp_path: Path, model_dir: Path, url: str | list[str], max_steps: int):
    """``url``: one server (``engine.vllm.url``), or a list of several (``engine.vllm.urls``)."""
    return parse_recipe({
        "name": "grpo-vllm", "output_dir": str(tmp_path), "seed": 1,
        "model": {"name": str(model_dir)},
        "engine": {"kind": "vllm", "vllm": {"urls" if isinstance(url, list) else "url": url, "max_lora_rank": 8}},
        "env": {"name": "parity", "mode": "any"},
        "data": {"train": "all", "val": "all"},
        "runner": {"concurrency": 8},
        "sampling": {"train": {"temperature": 1.0, "max_tokens": 6}, "eval": {"temperature": 0.0, "max_tokens": 6}},
        "algorithm": {"name": "grpo", "max_steps": max_steps, "tasks_per_step": 2, "num_generations": 4,
                      "learning_rate": 0.05, "eval_steps": 10, "save_steps": 1, "max_completion_length": 8,
                      "vllm_importance_sampling_mode": "token_mask", "lora": {"r": 4, "alpha": 8}},
    })


def test_grpo_syncs_an_adapter_version_per_step_with_importance_sampling(
    fake: tuple[FakeVLLM, str], tiny_model_dir: Path, tmp_path: Path
) -> None:
    server, url = fake
    trainer = Trainer(grpo_recipe(tmp_path, tiny_model_dir, url, max_steps=2), progress=False)
    try:
        trainer.fit()
    finally:
        trainer.close()
    run = tmp_path / "grpo-vllm"
    # policy-v0 (the fresh adapter) before training, then one version per optimiser step, the older one unloaded
    assert server.lora_calls == [("load", "policy-v0"), ("load", "policy-v1"), ("unload", "policy-v0"),
                                 ("load", "policy-v2"), ("unload", "policy-v1")]
    assert {body["model"] for body in server.requests} == {"policy-v0", "policy-v1", "policy-v2"}
    logs = two_synced_steps(run)
    synced, final = load_file(str(run / "adapters" / "policy-v2" / "adapter_model.safetensors")), \
        load_file(str(run / "final" / "adapter_model.safetensors"))
    assert synced.keys() == final.keys() and all(torch.equal(synced[k], final[k]) for k in synced)

    # TRL corrected with the server's logprobs: the same float32 weights sampled, so the ratios are 1
    for log in logs:
        assert log["sampling/importance_sampling_ratio/mean"] == pytest.approx(1.0, abs=1e-3)
        assert log["sampling/importance_sampling_ratio/min"] == pytest.approx(1.0, abs=1e-3)
        assert log["sampling/sampling_logp_difference/max"] < 1e-3

    # resumed against the same (still running) server: the checkpoint's weights replace its stale policy-v2
    del server.lora_calls[:]
    resumed = Trainer(grpo_recipe(tmp_path, tiny_model_dir, url, max_steps=3), progress=False)
    try:
        resumed.fit(resume=True)
    finally:
        resumed.close()
    assert server.lora_calls == [("load", "policy-v0"), ("unload", "policy-v2"), ("load", "policy-v2"),
                                 ("unload", "policy-v0"), ("load", "policy-v3"), ("unload", "policy-v2")]
    assert [p.name for p in (run / "adapters").iterdir()] == ["policy-v3"]


def test_grpo_over_two_engines_syncs_both_before_each_step_samples(tiny_model_dir: Path, tmp_path: Path) -> None:
    """``engine.vllm.urls`` with two servers: every adapter version is loaded on both before the step that samples
    it, both sample (the step's 8 concurrent rollouts spread by load), and neither ever serves an older version
    after a newer one."""
    fakes = [FakeVLLM(tiny_model_dir, str(tiny_model_dir), max_lora_rank=8) for _ in range(2)]
    with GatewayServer(fakes[0].app) as first, GatewayServer(fakes[1].app) as second:
        trainer = Trainer(grpo_recipe(tmp_path, tiny_model_dir, [first.base_url, second.base_url], max_steps=2),
                          progress=False)
        try:
            trainer.fit()
        finally:
            trainer.close()
    two_synced_steps(tmp_path / "grpo-vllm")
    for fake in fakes:
        assert fake.lora_calls == [("load", "policy-v0"), ("load", "policy-v1"), ("unload", "policy-v0"),
                                   ("load", "policy-v2"), ("unload", "policy-v1")]
        versions = [int(body["model"].removeprefix("policy-v")) for body in fake.requests]
        assert versions == sorted(versions) and {0, 1, 2} <= set(versions), versions


def test_serving_stack_on_vllm_serves_base_weights_or_the_given_adapter(
    fake: tuple[FakeVLLM, str], tiny_model_dir: Path, tmp_path: Path
) -> None:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    server, url = fake
    recipe = grpo_recipe(tmp_path, tiny_model_dir, url, max_steps=1)
    with ServingStack(recipe, MemoryStore()) as stack:
        assert stack.model_name == str(tiny_model_dir) and stack.engine.policy_version == 0
    assert server.lora_calls == []
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), recipe.algorithm.lora.to_peft())
    with ServingStack(recipe, MemoryStore(), model=model) as stack:
        assert stack.engine.loaded_versions == [0]
    assert server.lora_calls == [("load", "policy-v0")]
    assert (recipe.run_dir / "adapters" / "policy-v0" / "adapter_config.json").exists()

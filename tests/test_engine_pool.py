"""Several vLLM engines behind one gateway (:mod:`rltrain.engines.engine_pool`), against vLLM-compatible servers
(``tests/fake_vllm.py``: vLLM's API, a real tiny model, real PEFT adapters): a rollout's requests stay on one
engine, new rollouts go to the least loaded one, an adapter version reaches every engine, and an engine that dies
leaves the rotation with its reason logged while its rollouts move on. The recipe fields (``urls``, ``replicas``)
and the GPU split of started replicas are checked here too. The GRPO run over two engines is in
``test_weight_sync.py``; two real CPU vLLM servers in ``test_vllm_real.py``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from adapter_sync import make_adapter
from fake_vllm import FakeVLLM
from test_engine_vllm import DIES_MID_STREAM, FAKE, PROMPT, vllm_recipe

from rltrain.engines.base import EngineError, GenerationRequest, GenerationResult, OnToken
from rltrain.engines.engine_pool import EnginePool, NoEngineLeftError, vllm_engine
from rltrain.engines.vllm_server import VLLMStartupError, replica_devices, vllm_environment
from rltrain.engines.vllm_server import main as vllm_server_main
from rltrain.gateway.app import create_app
from rltrain.gateway.server import GatewayServer
from rltrain.recipes import RecipeError, parse_recipe
from rltrain.store.memory import MemoryStore
from rltrain.types import Rollout, Task


def generate(pool: EnginePool, session: str | None, on_token: OnToken | None = None, **fields: Any
             ) -> GenerationResult:
    request = GenerationRequest(**{"prompt_ids": PROMPT, "max_tokens": 4, "session": session, **fields})
    return asyncio.run(pool.generate(request, on_token=on_token))


def served_by(fakes: list[FakeVLLM], prompt_tail: int) -> list[int]:
    """Which fakes (by index) got a request whose prompt ends with ``prompt_tail``, one entry per request."""
    return [i for i, fake in enumerate(fakes) for body in fake.requests if body["prompt"][-1] == prompt_tail]


# -- the recipe ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("vllm", "message"), [
    ({"url": "http://a:1", "urls": ["http://b:1"]}, "url='http://a:1' and urls=['http://b:1']: set one"),
    ({"urls": ["http://a:1", "http://a:1"]}, "urls lists ['http://a:1'] more than once"),
    ({"urls": ["a:1"]}, "server URL 'a:1' must start with http://"),
    ({"urls": ["http://a:1", "http://b:1"], "replicas": 2}, "replicas=2 starts servers, url/urls name running"),
    ({"replicas": 2, "weight_sync": "merged"}, "weight_sync=merged pushes weights to one server"),
    ({"replicas": 0}, "replicas: Input should be greater than or equal to 1 (got 0)"),
])
def test_several_engines_are_configured_one_way(vllm: dict[str, Any], message: str) -> None:
    with pytest.raises(RecipeError, match=f"engine.vllm.*{re.escape(message)}"):
        parse_recipe({"name": "x", "engine": {"kind": "vllm", "vllm": vllm}})
    recipe = parse_recipe({"name": "x", "engine": {"kind": "vllm", "vllm": {"urls": ["http://a:1", "http://b:1"]}}})
    assert recipe.engine.vllm.engine_count == 2
    assert parse_recipe({"name": "x", "engine": {"kind": "vllm", "vllm": {"url": "http://a:1"}}}).engine.vllm \
        .server_urls() == ["http://a:1"]


def test_started_gpu_replicas_get_gpus_of_their_own(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = parse_recipe({"name": "x", "model": {"device": "cuda"},
                           "engine": {"kind": "vllm", "vllm": {"replicas": 2, "tensor_parallel_size": 2}}})
    assert replica_devices(recipe, 0, "4,5,6,7") == ["4", "5"]
    assert replica_devices(recipe, 1, "4,5,6,7") == ["6", "7"]
    assert vllm_environment(recipe, {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}, replica=1)["CUDA_VISIBLE_DEVICES"] == "2,3"
    with pytest.raises(VLLMStartupError, match=r"replicas=2 x tensor_parallel_size=2 needs 4 GPUs, but 3 are visible"):
        replica_devices(recipe, 0, "0,1,2")
    one = parse_recipe({"name": "x", "model": {"device": "cuda"}, "engine": {"kind": "vllm"}})
    assert vllm_environment(one, {"CUDA_VISIBLE_DEVICES": "3"}) == {"CUDA_VISIBLE_DEVICES": "3",
                                                                     "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    # the module that runs one server for a launch script refuses a recipe of several
    recipe_file = tmp_path / "replicas.yaml"
    recipe_file.write_text("name: x\nengine: {kind: vllm, vllm: {replicas: 2}}\n")
    with pytest.raises(SystemExit) as exited:
        vllm_server_main([str(recipe_file), "--print"])
    assert exited.value.code == 2 and "engine.vllm.replicas=2: this runs one server" in capsys.readouterr().err


# -- two servers in this process --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def servers(tiny_model_dir: Path) -> Iterator[list[tuple[FakeVLLM, str]]]:
    fakes = [FakeVLLM(tiny_model_dir, str(tiny_model_dir), max_lora_rank=16) for _ in range(2)]
    with GatewayServer(fakes[0].app) as first, GatewayServer(fakes[1].app) as second:
        yield [(fakes[0], first.base_url), (fakes[1], second.base_url)]


@pytest.fixture
def pool(servers: list[tuple[FakeVLLM, str]], tmp_path: Path, tiny_model_dir: Path) -> Iterator[EnginePool]:
    for fake, _ in servers:
        fake.requests.clear()
        fake.lora_calls.clear()
        fake.gate = None
    pool = vllm_engine(vllm_recipe(tmp_path, tiny_model_dir, urls=[url for _, url in servers]))
    assert isinstance(pool, EnginePool)
    yield pool
    for fake, _ in servers:  # leave the shared servers without this test's adapters
        for name in list(fake.adapters):
            fake.unload(name)
    pool.close()


def test_a_rollout_stays_on_its_engine_and_new_rollouts_go_to_the_least_loaded(
    pool: EnginePool, servers: list[tuple[FakeVLLM, str]]
) -> None:
    fakes = [fake for fake, _ in servers]
    fakes[0].gate = threading.Semaphore(0)  # engine 0 holds its first request until released

    async def scenario() -> None:
        held = asyncio.ensure_future(pool.generate(GenerationRequest(prompt_ids=[*PROMPT, 1], max_tokens=4,
                                                                     session="a")))
        while not fakes[0].requests:  # rollout a is in flight on engine 0
            await asyncio.sleep(0.01)
        for tail, session in ((2, "b"), (3, "c")):  # while it is busy, new rollouts go to engine 1
            await pool.generate(GenerationRequest(prompt_ids=[*PROMPT, tail], max_tokens=4, session=session))
        fakes[0].gate = None
        await held

    asyncio.run(scenario())
    assert (served_by(fakes, 1), served_by(fakes, 2), served_by(fakes, 3)) == ([0], [1], [1])
    # each rollout's next request goes back to its engine, though engine 1 has served more
    for tail, session in ((1, "a"), (2, "b"), (3, "c")):
        generate(pool, session, prompt_ids=[*PROMPT, tail])
    assert (served_by(fakes, 1), served_by(fakes, 2), served_by(fakes, 3)) == ([0, 0], [1, 1], [1, 1])
    assert pool.requests_per_engine == {servers[0][1]: 2, servers[1][1]: 4}
    # requests without a session go to the idle engine that served fewer
    for _ in range(2):
        generate(pool, None, prompt_ids=[*PROMPT, 9])
    assert served_by(fakes, 9) == [0, 0]


def test_the_gateway_keeps_each_rollouts_turns_on_one_engine(
    pool: EnginePool, servers: list[tuple[FakeVLLM, str]]
) -> None:
    fakes = [fake for fake, _ in servers]
    store = MemoryStore()
    store.enqueue_rollouts([Rollout(rollout_id=f"ro-{i}", task=Task(id=f"t{i}", payload={})) for i in range(2)])
    assert store.claim_rollout("w") is not None and store.claim_rollout("w") is not None
    with GatewayServer(create_app(pool, store)) as gateway:
        for rollout in ("ro-0", "ro-1"):
            client = openai.OpenAI(base_url=f"{gateway.base_url}/rollouts/{rollout}/v1", api_key="x", max_retries=0)
            messages: list[dict[str, Any]] = [{"role": "user", "content": f"Pick a room for {rollout}."}]
            for turn in range(2):
                reply = client.chat.completions.create(model=pool.model_name, messages=messages, max_tokens=3)
                messages += [{"role": "assistant", "content": reply.choices[0].message.content or ""},
                             {"role": "user", "content": f"And turn {turn}?"}]
    assert [len(fake.requests) for fake in fakes] == [2, 2]
    first_prompts = [fake.requests[0]["prompt"] for fake in fakes]
    for fake, first in zip(fakes, first_prompts, strict=True):  # the second turn extends the first: one rollout
        assert fake.requests[1]["prompt"][:len(first)] == first
    assert len(store.get_spans("ro-0")) == len(store.get_spans("ro-1")) == 2


def test_an_adapter_version_reaches_every_engine_before_the_switch(
    pool: EnginePool, servers: list[tuple[FakeVLLM, str]], tiny_model_dir: Path, tmp_path: Path
) -> None:
    from accelerate import PartialState
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rltrain.algorithms.weight_sync import AdapterPublisher

    fakes = [fake for fake, _ in servers]
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        str(make_adapter(tiny_model_dir, tmp_path / "seed", seed=1)), is_trainable=True,
    )
    publisher = AdapterPublisher(pool, tmp_path / "adapters", 16, PartialState())
    publisher.publish(model, 1)
    publisher.publish(model, 2)
    for fake in fakes:
        assert fake.lora_calls == [("load", "policy-v1"), ("load", "policy-v2"), ("unload", "policy-v1")]
    assert pool.policy_version == 2 and pool.loaded_versions == [2]
    outputs = [generate(pool, session, temperature=0.0, max_tokens=6) for session in ("a", "b")]
    assert [fake.requests[-1]["model"] for fake in fakes] == ["policy-v2", "policy-v2"]
    assert {r.policy_version for r in outputs} == {2}
    assert outputs[0].completions[0].completion_ids == outputs[1].completions[0].completion_ids  # same weights


def test_a_failure_of_a_healthy_engine_is_the_requests_not_the_engines(
    pool: EnginePool, servers: list[tuple[FakeVLLM, str]]
) -> None:
    servers[0][0].fail_next.append((500, {"error": {"message": "CUDA error: device-side assert", "code": 500}}))
    with pytest.raises(EngineError, match="CUDA error"):
        generate(pool, "a")
    assert len(pool.engines) == 2
    assert len(generate(pool, "a").completions) == 1  # engine 0 serves on


# -- servers that rltrain starts, and that die -------------------------------------------------------------------
def test_a_dead_engine_leaves_the_rotation_and_its_rollouts_move(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two replicas started by rltrain (vllm.log, vllm-1.log), no restarts. Engine 0 dies in a stream after two
    tokens went out: that request fails (it is not re-sampled elsewhere), the engine is retired with one WARNING
    naming its URL and why, and its rollout continues on engine 1. Then engine 1 is killed: no engine is left, and
    the error names both."""
    script = tmp_path / "dies_mid_stream.py"
    script.write_text(DIES_MID_STREAM.format(fake=str(FAKE.parent)))
    recipe = vllm_recipe(tmp_path, tiny_model_dir, command=f"{sys.executable} {script}", replicas=2, max_restarts=0)
    pool = vllm_engine(recipe)
    assert isinstance(pool, EnginePool)
    try:
        first, second = pool.engines
        assert first.server is not None and second.server is not None
        assert first.server.log_path.name == "vllm.log" and second.server.log_path.name == "vllm-1.log"
        assert first.base_url != second.base_url
        assert len(generate(pool, "a").completions) == 1 and len(generate(pool, "b").completions) == 1
        reported: list[int] = []
        already_sent = r"2 token\(s\) of this streamed request were already sent on"
        with caplog.at_level(logging.WARNING, logger="rltrain.engines.engine_pool"), \
                pytest.raises(EngineError, match=already_sent):
            generate(pool, "a", on_token=lambda i, token, lp: reported.append(token), max_tokens=8)
        assert len(reported) == 2
        [warning] = [r for r in caplog.records if r.name == "rltrain.engines.engine_pool"]
        assert warning.levelno == logging.WARNING
        assert f"vLLM engine {first.base_url} is out of rotation" in warning.getMessage()
        assert "the stream broke after 2 token(s)" in warning.getMessage() and "/health" in warning.getMessage()
        assert "1 rollout(s) move to the 1 engine(s) left" in warning.getMessage()
        assert not first.server.alive
        # rollout a goes on, on engine 1
        assert len(generate(pool, "a").completions) == 1
        assert pool.engines == [second] and pool.requests_per_engine[second.base_url] == 2
        os.killpg(second.server.pid, signal.SIGKILL)
        with pytest.raises(NoEngineLeftError, match=rf"(?s)every vLLM engine.*{first.base_url}.*{second.base_url}"):
            generate(pool, "b")
        with pytest.raises(NoEngineLeftError):
            pool.set_policy_version(0)
    finally:
        pool.close()

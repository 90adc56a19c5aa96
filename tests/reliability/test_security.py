"""Security: loopback binds by default, an API key checked on every route when set, rollouts that cannot reach
each other's records through the gateway, and no secret in the store, the logs, the metrics or the run directory.

(Tool arguments written by the model are validated before a tool runs: tests/reliability/test_model_faults.py.)
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute
from live_gateway import QUESTION, error_of, serve, start_rollouts

from rltrain.agent import rollout
from rltrain.cli import main
from rltrain.engines.transformers import TransformersEngine
from rltrain.gateway import GatewayServer, InsecureBindError, create_app
from rltrain.recipes import GatewayConfig, RunnerConfig, parse_recipe
from rltrain.runner import Runner
from rltrain.serving import GatewayConfigError, ServingStack
from rltrain.store import MemoryStore
from rltrain.trainer import Trainer
from rltrain.types import LLMCallRecord, LLMResource, Resources, SpanKind, Task


# -- binding ------------------------------------------------------------------------------------------------
def test_servers_bind_loopback_unless_told_otherwise(engine: TransformersEngine) -> None:
    assert GatewayConfig().host == "127.0.0.1"
    with GatewayServer(create_app(engine, None)) as server:
        assert server.base_url.startswith("http://127.0.0.1:")
    for host in ("0.0.0.0", "::", "192.0.2.7", "example.org"):
        with pytest.raises(InsecureBindError, match="without an API key"):
            GatewayServer(create_app(engine, None), host=host)


def test_cli_refuses_a_public_bind_without_a_key_before_loading_anything(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    code = main(["serve", "--host", "0.0.0.0", "--port", "0", "--set", f"output_dir={tmp_path}",
                 "--set", "model.name=no-such-model-is-loaded"])
    assert code == 2
    assert "gateway.host='0.0.0.0' is not a loopback address" in caplog.text and "api_key_env" in caplog.text
    recipe = parse_recipe({"gateway": {"host": "0.0.0.0"}})
    with pytest.raises(GatewayConfigError, match="not a loopback address"):
        ServingStack(recipe, MemoryStore())


# -- the API key ------------------------------------------------------------------------------------------------
def _every_route(app: Any) -> list[tuple[str, str]]:
    """(method, path) of every route the app serves, path parameters filled in."""
    routes = []
    for route in app.routes:
        if isinstance(route, APIRoute):
            path = route.path.replace("{rollout_id}", "ro-key").replace("{attempt_no}", "1")
            routes.extend((method, path) for method in sorted(route.methods))
    return routes


def test_api_key_is_checked_on_every_route(engine: TransformersEngine) -> None:
    key = secrets.token_hex(16)
    store = MemoryStore()
    start_rollouts(store, ["ro-key"])
    app = create_app(engine, store, api_key=key)
    routes = _every_route(app)
    assert len(routes) >= 7, routes  # health, models and chat, each plain, per rollout and per attempt
    body = {"model": engine.model_name, "messages": QUESTION, "max_tokens": 2}
    with serve(engine, store, api_key=key) as served:
        for method, path in routes:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": key}):
                response = httpx.request(method, f"{served.url}{path}", json=body, headers=headers, timeout=30)
                assert error_of(response, 401)["type"] == "authentication_error", (method, path, headers)
            response = httpx.request(method, f"{served.url}{path}", json=body, timeout=30,
                                     headers={"Authorization": f"Bearer {key}"})
            assert response.status_code == 200, (method, path, response.text)
    assert len(store.get_spans("ro-key")) == 2  # the two authorised chat calls on ro-key's routes


# -- one rollout cannot reach another's records -----------------------------------------------------------------
def test_rollouts_cannot_read_or_write_each_others_spans(engine: TransformersEngine) -> None:
    store = MemoryStore()
    start_rollouts(store, ["ro-alice", "ro-bob"])
    with serve(engine, store) as served:
        alice, bob = served.client("ro-alice"), served.client("ro-bob")
        model = engine.model_name
        first = alice.chat.completions.create(model=model, messages=QUESTION, max_tokens=3, temperature=0)
        # bob replays alice's whole conversation: served from his own (empty) session, not from hers
        replay = [*QUESTION, first.choices[0].message.model_dump(exclude_none=True), {"role": "user", "content": "?"}]
        bob.chat.completions.create(model=model, messages=replay, max_tokens=3, temperature=0)
        [alices] = [LLMCallRecord.model_validate(s.attributes) for s in store.get_spans("ro-alice")]
        [bobs] = [LLMCallRecord.model_validate(s.attributes) for s in store.get_spans("ro-bob")]
        assert not bobs.prefix_reused
        # no route reads spans, and a path cannot climb from one rollout to another
        for path in ("/rollouts/ro-alice/spans", "/rollouts/ro-alice/v1/spans", "/rollouts/ro-alice/attempts/1",
                     "/v1/rollouts/ro-alice", "/rollouts/ro-alice/attempts/1/v1/chat/completions"):
            response = httpx.get(f"{served.url}{path}")
            assert response.status_code in (404, 405) and "prompt_ids" not in response.text, path
        body = {"model": model, "messages": QUESTION, "max_tokens": 2}
        for sneaky in ("ro-bob%2F..%2Fro-alice", "ro-bob%2Fattempts%2F1", "..%2Fro-alice", "ro-alice%00"):
            response = served.post(f"/rollouts/{sneaky}/attempts/1/v1/chat/completions", body)
            assert response.status_code == 404, (sneaky, response.text)
        bad_attempt = served.post("/rollouts/ro-alice/attempts/first/v1/chat/completions", body)
        assert error_of(bad_attempt, 400)["param"] == "path.attempt_no"
    assert [LLMCallRecord.model_validate(s.attributes) for s in store.get_spans("ro-alice")] == [alices]
    assert [LLMCallRecord.model_validate(s.attributes) for s in store.get_spans("ro-bob")] == [bobs]


def test_a_rollouts_url_reveals_no_other_rollouts_url() -> None:
    """An agent sees its own rollout id (in its base URL); ids are random, so it cannot derive a sibling's URL
    from it (the counter-based ids made for spans would give the next rollout's id by adding one)."""
    seen: list[str] = []

    @rollout
    async def agent(task: dict[str, Any], resources: Resources) -> float:
        seen.append(resources.llm.base_url)
        return 1.0

    store = MemoryStore()
    runner = Runner(store, agent, "http://gw", RunnerConfig(concurrency=4), progress=False)
    result = asyncio.run(runner.run([Task(id="t", payload={})], Resources(llm=LLMResource(base_url="", model="m")),
                                    mode="eval", group_size=64))
    ids = sorted(int(r.rollout_id.removeprefix("ro-"), 16) for r in result.rollouts)
    assert len(set(ids)) == 64
    assert min(b - a for a, b in itertools.pairwise(ids)) > 2**32, "ids are not a sequence"
    assert sorted(seen) == sorted(f"http://gw/rollouts/{r.rollout_id}/attempts/1/v1" for r in result.rollouts)


# -- no secret written anywhere --------------------------------------------------------------------------------
def test_the_api_key_reaches_agents_and_nothing_else(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A training step with the gateway behind an API key: the agents are lent the key and their calls pass
    (the run trains), and the key appears in no file of the run directory and in no log record."""
    key = f"sk-rltrain-{secrets.token_hex(12)}"
    monkeypatch.setenv("RLTRAIN_TEST_GATEWAY_KEY", key)
    caplog.set_level(logging.DEBUG)
    recipe = parse_recipe({
        "name": "keyed", "output_dir": str(tmp_path), "model": {"name": str(tiny_model_dir)},
        "gateway": {"api_key_env": "RLTRAIN_TEST_GATEWAY_KEY"},
        "env": {"name": "even_length_env:EvenLengthEnv", "mode": "any", "options": {"n_tasks": 2}},
        "data": {"train": "all", "val": "all"},
        "sampling": {"train": {"temperature": 1.0, "max_tokens": 4}, "eval": {"max_tokens": 4}},
        "algorithm": {"name": "grpo", "max_steps": 1, "tasks_per_step": 1, "num_generations": 2,
                      "save_steps": 1, "lora": {"r": 2, "alpha": 4}},
    })
    trainer = Trainer(recipe, progress=False)
    try:
        [summary] = trainer.fit()
        rollouts = trainer.store.list_rollouts()
        spans = [s for r in rollouts for s in trainer.store.get_spans(r.rollout_id)]
    finally:
        trainer.close()
    assert summary.failed == 0 and all(r.error is None for r in rollouts), "every call passed the key check"
    assert sum(s.kind is SpanKind.LLM for s in spans) == len(rollouts) >= 2 + 2 + 2  # baseline, step, final
    run_dir = tmp_path / "keyed"
    files = [path for path in run_dir.rglob("*") if path.is_file()]
    assert any(p.name == "store.sqlite" for p in files) and any(p.name == "metrics.jsonl" for p in files)
    assert any("checkpoint-1" in p.parts for p in files)
    leaked = [str(p.relative_to(run_dir)) for p in files if key.encode() in p.read_bytes()]
    assert leaked == []
    assert key not in caplog.text
    assert all(key not in str(record.args) for record in caplog.records)

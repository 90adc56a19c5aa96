"""Load: 64 rollouts at once against the embedded engine, through the runner, the gateway and the SQLite store.

Each rollout is a two-turn conversation (the second turn reuses the first's token ids), so the gateway holds a
session per running rollout. Checked: no rollout lost, none counted twice, every call recorded exactly once in
its own rollout, the gateway's sessions released as rollouts finish (its memory does not grow with the number
of finished rollouts), and the store sound afterwards. Throughput is logged, never asserted.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from pathlib import Path

import openai
from live_gateway import serve

from rltrain.agent import rollout
from rltrain.engines.transformers import TransformersEngine
from rltrain.recipes import RunnerConfig
from rltrain.runner import Runner
from rltrain.store import SqliteStore
from rltrain.types import LLMCallRecord, LLMResource, Resources, RolloutStatus, SamplingParams, SpanKind, Task

logger = logging.getLogger(__name__)

CONCURRENCY = 64
ROLLOUTS = 2 * CONCURRENCY  # two waves: the second reuses the first wave's workers and threads


@rollout
def two_turn_agent(task: dict, resources: Resources) -> float:
    """Ask, then follow up on the reply: the second call extends the first turn's session."""
    with openai.OpenAI(base_url=resources.llm.base_url, api_key=resources.llm.api_key, max_retries=0) as client:
        messages = [{"role": "user", "content": f"Pick a room for team {task['team']}."}]
        for _ in range(2):
            reply = client.chat.completions.create(
                model=resources.llm.model, messages=messages, max_tokens=resources.llm.sampling.max_tokens,
                temperature=1.0,
            )
            messages += [reply.choices[0].message.model_dump(exclude_none=True),
                         {"role": "user", "content": "Why?"}]
    return float(task["team"] % 2)


def test_64_concurrent_rollouts_none_lost_none_twice_sessions_released(
    engine: TransformersEngine, tmp_path: Path
) -> None:
    store = SqliteStore(tmp_path / "store.sqlite")
    tasks = [Task(id=f"team-{i}", payload={"team": i}) for i in range(ROLLOUTS)]
    resources = Resources(llm=LLMResource(base_url="", model=engine.model_name,
                                          sampling=SamplingParams(max_tokens=4)))
    with serve(engine, store) as served:
        sessions = served.service.sessions
        peak_sessions = 0

        def release(finished) -> None:
            nonlocal peak_sessions
            peak_sessions = max(peak_sessions, len(sessions))
            served.service.release_rollout(finished.rollout_id)

        runner = Runner(store, two_turn_agent, served.url, RunnerConfig(concurrency=CONCURRENCY, timeout_s=120),
                        on_finished=release, progress=False)
        result = asyncio.run(runner.run(tasks, resources, mode="eval"))
        assert len(sessions) == 0, "every finished rollout's session was released"
    stats = result.stats
    logger.info("%d rollouts (%d llm calls), %d at once: %.1f rollouts/s, %.1f calls/s, %d sessions at most",
                ROLLOUTS, 2 * ROLLOUTS, CONCURRENCY, stats.total / stats.wall_s, 2 * stats.total / stats.wall_s,
                peak_sessions)

    assert stats.succeeded == stats.total == ROLLOUTS and stats.retries == 0
    assert peak_sessions <= CONCURRENCY
    rollouts = result.rollouts
    assert [r.task.id for r in rollouts] == [t.id for t in tasks]
    assert len({r.rollout_id for r in rollouts}) == ROLLOUTS
    assert all(r.status is RolloutStatus.SUCCEEDED and r.reward == r.task.payload["team"] % 2 for r in rollouts)
    stored = store.list_rollouts(mode="eval")
    assert Counter(r.rollout_id for r in stored) == Counter(r.rollout_id for r in rollouts)
    for r in rollouts:
        spans = store.get_spans(r.rollout_id)
        assert [s.kind for s in spans] == [SpanKind.LLM, SpanKind.LLM], r.rollout_id
        first, second = (LLMCallRecord.model_validate(s.attributes) for s in spans)
        assert f"team {r.task.payload['team']}." in engine.tokenizer.decode(first.prompt_ids)
        assert second.prefix_reused, "its own first turn, not another rollout's"
        assert second.prompt_ids[: len(first.prompt_ids)] == first.prompt_ids
    assert store.integrity_check() == []
    store.close()

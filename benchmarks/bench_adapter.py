"""Adapter throughput: 1000 rollouts x 5 llm calls (prompts growing 200 -> 800 tokens, 50-token completions with
logprobs, one reward) -> training rows.

rltrain: :meth:`rltrain.adapters.TrajectoryAdapter.adapt_many` on (rollout, spans) pairs whose llm spans carry
the :class:`~rltrain.types.LLMCallRecord` the gateway records; it merges the five calls into one prefix-consistent
row per rollout with its ``env_mask`` and logprobs. Peer: Agent Lightning's ``TracerTraceToTriplet.adapt`` on the
spans its tracer records for the same calls (``openai.chat.completion`` spans with flattened ``gen_ai.*``
attributes, ``prompt_token_ids`` / ``response_token_ids``, ``logprobs.content``, under one agent span, plus an
``emit_reward`` span); it yields five triplets per rollout. Both sides get the same token ids, messages and
texts (:func:`_workloads.adapter_rollout`), built before the timed region. Target (issue 8): >= 10x.

The peer is measured twice: with spans as its tracer records them (every chat message flattened into
``gen_ai.prompt.<i>.*`` attributes) and with lean spans that carry only what its adapter needs for training
(token ids, logprobs, response id). The lean figure is the faster one and the one the target is judged on.
``python benchmarks/bench_adapter.py`` (``--json`` for machine-readable rows).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPEATS, Row, log, median, report
from _peer import run_peer
from _workloads import ADAPTER_CALLS, ADAPTER_ROLLOUTS, adapter_rollouts

PEER_SCRIPT = r"""
import json, logging, statistics, sys, time
logging.disable(logging.CRITICAL)
from agentlightning import TracerTraceToTriplet, emit_reward
from agentlightning.types import Span
from _workloads import adapter_rollouts

spec = json.load(sys.stdin)

def llm_attributes(call, messages):
    attrs = {
        "gen_ai.system": "OpenAI", "llm.request.type": "chat", "gen_ai.request.model": "policy",
        "gen_ai.request.max_tokens": 50, "gen_ai.request.temperature": 1.0,
    }
    for i, message in enumerate(call["messages"] if messages else []):
        attrs[f"gen_ai.prompt.{i}.role"] = message["role"]
        attrs[f"gen_ai.prompt.{i}.content"] = message["content"]
    attrs.update({
        "gen_ai.response.model": "policy", "gen_ai.response.id": call["response_id"],
        "gen_ai.completion.0.role": "assistant", "gen_ai.completion.0.content": call["text"] if messages else "",
        "gen_ai.completion.0.finish_reason": "stop",
        "gen_ai.usage.prompt_tokens": len(call["prompt_ids"]),
        "gen_ai.usage.completion_tokens": len(call["completion_ids"]),
        "llm.usage.total_tokens": len(call["prompt_ids"]) + len(call["completion_ids"]),
        "prompt_token_ids": call["prompt_ids"], "response_token_ids": call["completion_ids"],
        "logprobs.content": json.dumps(
            [{"token": f"t{t}", "logprob": lp, "bytes": None, "top_logprobs": []}
             for t, lp in zip(call["completion_ids"], call["logprobs"])]
        ),
    })
    return attrs

def spans_of(rollout, messages):
    rid, common = rollout["rollout_id"], {"rollout_id": rollout["rollout_id"], "attempt_id": "at-1"}
    root = Span.from_attributes(attributes={"agentops.span.kind": "session"}, name="agent.rollout",
                                sequence_id=0, start_time=0.0, end_time=100.0, **common)
    spans = [root]
    for k, call in enumerate(rollout["calls"]):
        spans.append(Span.from_attributes(attributes=llm_attributes(call, messages), name="openai.chat.completion",
                                          sequence_id=k + 1, trace_id=root.trace_id, parent_id=root.span_id,
                                          start_time=10.0 * k + 1, end_time=10.0 * k + 5, **common))
    reward = emit_reward(rollout["reward"], propagate=False)
    spans.append(Span.from_attributes(attributes=reward.attributes, name=reward.name, sequence_id=len(spans),
                                      trace_id=root.trace_id, parent_id=root.span_id,
                                      start_time=60.0, end_time=60.0, **common))
    return spans

rollouts = adapter_rollouts(spec["rollouts"])
adapter = TracerTraceToTriplet()
result = {}
for variant, messages in (("full", True), ("tokens_only", False)):
    traces = [spans_of(r, messages) for r in rollouts]
    rates = []
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        triplets = [adapter.adapt(spans) for spans in traces]
        rates.append(len(traces) / (time.perf_counter() - start))
    assert all(len(t) == spec["calls"] for t in triplets), [len(t) for t in triplets[:3]]
    last = triplets[0][-1]
    assert last.reward == 1.0 and len(last.prompt["token_ids"]) == 800 and "logprobs" in last.response, last
    result[variant] = statistics.median(rates)
print(json.dumps(result))
"""


def rltrain_pairs(rollouts: list[dict[str, Any]]) -> list[tuple[Any, list[Any]]]:
    """The rollouts as the store would hand them to the adapter: a finished rollout and its spans, the llm
    spans carrying exactly what the gateway records (``LLMCallRecord.model_dump(mode="json")``)."""
    from rltrain.types import LLMCallRecord, Rollout, RolloutStatus, Span, SpanKind, Task

    pairs = []
    for data in rollouts:
        rid = data["rollout_id"]
        rollout = Rollout(
            rollout_id=rid,
            task=Task(id=data["task_id"], payload={}),
            status=RolloutStatus.SUCCEEDED,
            attempt_count=1,
            reward=data["reward"],
        )
        spans = []
        for k, call in enumerate(data["calls"]):
            n_prompt, n_completion = len(call["prompt_ids"]), len(call["completion_ids"])
            record = LLMCallRecord(
                model="policy",
                messages=call["messages"],
                prompt_ids=call["prompt_ids"],
                completion_ids=call["completion_ids"],
                logprobs=call["logprobs"],
                text=call["text"],
                finish_reason="stop",
                prefix_reused=k > 0,
                usage={
                    "prompt_tokens": n_prompt,
                    "completion_tokens": n_completion,
                    "total_tokens": n_prompt + n_completion,
                },
            )
            spans.append(
                Span(
                    rollout_id=rid,
                    sequence=k,
                    kind=SpanKind.LLM,
                    name="chat.completions",
                    attributes=record.model_dump(mode="json"),
                )
            )
        spans.append(
            Span(
                rollout_id=rid,
                sequence=len(spans),
                kind=SpanKind.REWARD,
                name="reward",
                attributes={"value": data["reward"]},
            )
        )
        pairs.append((rollout, spans))
    return pairs


def measure_rltrain() -> float:
    from rltrain.adapters import TrajectoryAdapter

    pairs = rltrain_pairs(adapter_rollouts())
    adapter = TrajectoryAdapter()
    rates = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        result = adapter.adapt_many(pairs)
        rates.append(len(pairs) / (time.perf_counter() - start))
    # one merged row per rollout: 200 prompt tokens, then 4 x (50 sampled + 100 env) + 50 sampled
    row = result.rows[0]
    assert len(result.rows) == len(pairs) and result.forked_rows == 0, result.metrics()
    assert len(row.prompt_ids) == 200 and len(row.completion_ids) == 650 and sum(row.env_mask) == 250
    return median(rates)


def run() -> list[Row]:
    log(f"adapter: rltrain TrajectoryAdapter, {ADAPTER_ROLLOUTS} rollouts x {ADAPTER_CALLS} calls")
    ours = measure_rltrain()
    log("adapter: Agent Lightning TracerTraceToTriplet")
    peer = run_peer(PEER_SCRIPT, {"rollouts": ADAPTER_ROLLOUTS, "calls": ADAPTER_CALLS, "repeats": REPEATS})
    return [
        Row(
            "adapter",
            "spans -> training rows",
            "rollouts/s",
            ours,
            peer["tokens_only"],
            target_ratio=10.0,
            note="peer spans with token ids + logprobs only",
        ),
        Row(
            "adapter",
            "spans -> training rows",
            "rollouts/s",
            ours,
            peer["full"],
            target_ratio=10.0,
            note="peer spans as its tracer records them, messages included",
        ),
    ]


if __name__ == "__main__":
    report(run())

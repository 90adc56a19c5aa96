"""Store throughput: 2000 rollouts x 10 spans through enqueue, claim, add spans, mark succeeded, read spans back.

rltrain: :class:`~rltrain.store.MemoryStore` and the durable :class:`~rltrain.store.SqliteStore` (a fresh file
per trial). Peer: Agent Lightning's ``InMemoryLightningStore`` (not durable). Targets (issue 8): the SQLite
store >= 1x the peer's in-memory store in every phase, the memory store >= 5x.

Both sides do the same work per phase and pay for building their own request records inside the timed region
(rltrain's ``Rollout``; the peer builds its rollout inside ``enqueue_*``). Spans are built before the timed
region on both sides. Writes are batched where each API allows: the 2000 rollouts are enqueued in one call and
each rollout's 10 spans are added in one call. The peer is measured with its per-item API
(``enqueue_rollout``, ``add_span``) and its batch API (``enqueue_many_rollouts``, ``add_many_spans``), and the
faster of the two is its figure. ``python benchmarks/bench_store.py`` (``--json`` for machine-readable rows).
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPEATS, Row, log, per_phase_medians, report
from _peer import run_peer
from _workloads import STORE_ROLLOUTS, STORE_SPANS_PER_ROLLOUT, store_span_attributes, store_tasks

if TYPE_CHECKING:
    from rltrain.store.base import Store

PHASES = (
    ("enqueue", "enqueue", "rollouts/s"),
    ("claim", "claim/start", "rollouts/s"),
    ("spans", "add spans", "spans/s"),
    ("succeed", "mark succeeded", "rollouts/s"),
    ("query", "query spans back", "rollouts/s"),
)

PEER_SCRIPT = r"""
import asyncio, json, logging, statistics, sys, time
logging.disable(logging.CRITICAL)
from agentlightning.store.memory import InMemoryLightningStore
from agentlightning.types import EnqueueRolloutRequest, Span
from _workloads import store_span_attributes, store_tasks

spec = json.load(sys.stdin)
tasks, attrs = store_tasks(spec["rollouts"]), store_span_attributes(spec["rollouts"], spec["spans_per_rollout"])

async def trial(batch):
    store = InMemoryLightningStore()
    out = {}
    start = time.perf_counter()
    if batch:
        await store.enqueue_many_rollouts([EnqueueRolloutRequest(input=p, mode="train") for p in tasks])
    else:
        for p in tasks:
            await store.enqueue_rollout(input=p, mode="train")
    out["enqueue"] = len(tasks) / (time.perf_counter() - start)
    start = time.perf_counter()
    claimed = [await store.dequeue_rollout(worker_id="w0") for _ in tasks]
    out["claim"] = len(tasks) / (time.perf_counter() - start)
    now = time.time()
    spans = [
        [
            Span.from_attributes(attributes=a, rollout_id=c.rollout_id, attempt_id=c.attempt.attempt_id,
                                 sequence_id=j + 1, name="tool", start_time=now, end_time=now)
            for j, a in enumerate(per)
        ]
        for c, per in zip(claimed, attrs)
    ]
    n_spans = sum(map(len, spans))
    start = time.perf_counter()
    for group in spans:
        if batch:
            await store.add_many_spans(group)
        else:
            for span in group:
                await store.add_span(span)
    out["spans"] = n_spans / (time.perf_counter() - start)
    start = time.perf_counter()
    for c in claimed:
        await store.update_attempt(c.rollout_id, c.attempt.attempt_id, status="succeeded")
    out["succeed"] = len(tasks) / (time.perf_counter() - start)
    start = time.perf_counter()
    read = 0
    for c in claimed:
        read += len(await store.query_spans(c.rollout_id))
    out["query"] = len(tasks) / (time.perf_counter() - start)
    assert read == n_spans, (read, n_spans)
    final = await store.get_rollout_by_id(claimed[-1].rollout_id)
    assert final.status == "succeeded", final.status
    return out

def medians(trials):
    return {k: statistics.median(t[k] for t in trials) for k in trials[0]}

per_item = medians([asyncio.run(trial(False)) for _ in range(spec["repeats"])])
batch = medians([asyncio.run(trial(True)) for _ in range(spec["repeats"])])
print(json.dumps({"per_item": per_item, "batch": batch}))
"""


def rltrain_trial(
    store: Store, tasks: list[dict[str, Any]], attrs: list[list[dict[str, Any]]]
) -> dict[str, float]:
    """One pass of the five phases on ``store``; figures in ops/s."""
    from rltrain.types import Rollout, RolloutStatus, Span, SpanKind, Task

    out: dict[str, float] = {}
    start = time.perf_counter()
    store.enqueue_rollouts([Rollout(task=Task(id=p["id"], payload=p)) for p in tasks])
    out["enqueue"] = len(tasks) / (time.perf_counter() - start)
    start = time.perf_counter()
    claimed = [store.claim_rollout("w0") for _ in tasks]
    out["claim"] = len(tasks) / (time.perf_counter() - start)
    now = time.time()
    spans = [
        [
            Span(
                rollout_id=r.rollout_id,
                attempt_no=a.attempt_no,
                kind=SpanKind.TOOL,
                name="tool",
                start_time=now,
                end_time=now,
                attributes=x,
            )
            for x in per
        ]
        for (r, a), per in zip(claimed, attrs)
    ]
    n_spans = sum(map(len, spans))
    start = time.perf_counter()
    for group in spans:
        store.add_spans(group)
    out["spans"] = n_spans / (time.perf_counter() - start)
    start = time.perf_counter()
    for rollout, attempt in claimed:
        store.finish_attempt(rollout.rollout_id, attempt.attempt_no, RolloutStatus.SUCCEEDED, reward=1.0)
    out["succeed"] = len(tasks) / (time.perf_counter() - start)
    start = time.perf_counter()
    read = 0
    for rollout, _ in claimed:
        read += len(store.get_spans(rollout.rollout_id))
    out["query"] = len(tasks) / (time.perf_counter() - start)
    assert read == n_spans, (read, n_spans)
    assert store.get_rollout(claimed[-1][0].rollout_id).status == RolloutStatus.SUCCEEDED
    return out


def measure_rltrain(make_store: Callable[[Path], Store]) -> dict[str, float]:
    tasks, attrs = store_tasks(), store_span_attributes()
    trials = []
    for _ in range(REPEATS):
        with tempfile.TemporaryDirectory(prefix="rltrain-bench-store-") as tmp:
            store = make_store(Path(tmp) / "store.sqlite")
            try:
                trials.append(rltrain_trial(store, tasks, attrs))
            finally:
                store.close()
    return per_phase_medians(trials)


def run() -> list[Row]:
    from rltrain.store import MemoryStore, SqliteStore

    log(
        f"store: rltrain MemoryStore, {STORE_ROLLOUTS} rollouts x {STORE_SPANS_PER_ROLLOUT} spans, {REPEATS} trials"
    )
    memory = measure_rltrain(lambda _path: MemoryStore())
    log("store: rltrain SqliteStore")
    sqlite = measure_rltrain(SqliteStore)
    log("store: Agent Lightning InMemoryLightningStore (per-item and batch APIs)")
    peer = run_peer(
        PEER_SCRIPT,
        {"rollouts": STORE_ROLLOUTS, "spans_per_rollout": STORE_SPANS_PER_ROLLOUT, "repeats": REPEATS},
    )
    rows = []
    for name, ours, target in (("SqliteStore", sqlite, 1.0), ("MemoryStore", memory, 5.0)):
        for key, label, unit in PHASES:
            best = max(peer["per_item"][key], peer["batch"][key])
            api = "batch" if peer["batch"][key] >= peer["per_item"][key] else "per-item"
            note = f"peer {api} API" if key in ("enqueue", "spans") else ""
            rows.append(Row(f"store/{name}", label, unit, ours[key], best, target_ratio=target, note=note))
    return rows


if __name__ == "__main__":
    report(run())

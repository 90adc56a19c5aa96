"""Store throughput: 2000 rollouts x 10 spans through enqueue, claim, add spans, mark succeeded, read spans back.

rltrain: :class:`~rltrain.store.MemoryStore` and the durable :class:`~rltrain.store.SqliteStore` (a fresh file
per trial). Peer: Agent Lightning's ``InMemoryLightningStore`` (not durable). Targets (issue 8): the SQLite
store >= 1x the peer's in-memory store in every phase, the memory store >= 5x.

Both sides do the same work per phase and pay for building their own records from the task dicts inside the
timed region (rltrain: a ``Task`` per dict, then ``enqueue_tasks``, the runner's path, makes the rollouts; the
peer: an ``EnqueueRolloutRequest`` per dict, then ``enqueue_many_rollouts`` makes its rollouts). Spans are built
before the timed region on both sides. Writes are batched where each API allows: the 2000 rollouts are
enqueued in one call and each rollout's 10 spans are added in one call (``add_spans``, durable when it
returns). The peer is measured with its per-item API (``enqueue_rollout``, ``add_span``) and its batch API
(``enqueue_many_rollouts``, ``add_many_spans``), and the faster of the two is its figure.

Every timed phase, on both sides, starts from a collected heap (``gc.collect()``): otherwise a full collection
owed to the previous phase's garbage lands in whichever phase allocates next, and cut the 7 ms ``MemoryStore``
enqueue phase to a quarter of its speed in 2 trials out of 8. The trials alternate: each of the 3 rounds runs
one trial of the peer's per-item API, of its batch API (in a peer process kept running), of ``MemoryStore`` and
of ``SqliteStore``, so that a change of load on a shared machine slows both systems alike.
``python benchmarks/bench_store.py`` (``--json`` for machine-readable rows).
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPEATS, Row, log, per_phase_medians, phase_start, report
from _peer import peer_session
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
import asyncio, gc, json, logging, sys, time
logging.disable(logging.CRITICAL)
from agentlightning.store.memory import InMemoryLightningStore
from agentlightning.types import EnqueueRolloutRequest, Span
from _workloads import store_span_attributes, store_tasks

spec = json.loads(sys.stdin.readline())

def phase_start():
    gc.collect()
    return time.perf_counter()

tasks, attrs = store_tasks(spec["rollouts"]), store_span_attributes(spec["rollouts"], spec["spans_per_rollout"])

async def trial(batch):
    store = InMemoryLightningStore()
    out = {}
    start = phase_start()
    if batch:
        await store.enqueue_many_rollouts([EnqueueRolloutRequest(input=p, mode="train") for p in tasks])
    else:
        for p in tasks:
            await store.enqueue_rollout(input=p, mode="train")
    out["enqueue"] = len(tasks) / (time.perf_counter() - start)
    start = phase_start()
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
    start = phase_start()
    for group in spans:
        if batch:
            await store.add_many_spans(group)
        else:
            for span in group:
                await store.add_span(span)
    out["spans"] = n_spans / (time.perf_counter() - start)
    start = phase_start()
    for c in claimed:
        await store.update_attempt(c.rollout_id, c.attempt.attempt_id, status="succeeded")
    out["succeed"] = len(tasks) / (time.perf_counter() - start)
    start = phase_start()
    read = 0
    for c in claimed:
        read += len(await store.query_spans(c.rollout_id))
    out["query"] = len(tasks) / (time.perf_counter() - start)
    assert read == n_spans, (read, n_spans)
    final = await store.get_rollout_by_id(claimed[-1].rollout_id)
    assert final.status == "succeeded", final.status
    return out

for line in sys.stdin:  # one trial per request, so that the caller can alternate them with its own
    print(json.dumps(asyncio.run(trial(json.loads(line)["batch"]))), flush=True)
"""


def rltrain_trial(
    store: Store, tasks: list[dict[str, Any]], attrs: list[list[dict[str, Any]]]
) -> dict[str, float]:
    """One pass of the five phases on ``store``; figures in ops/s."""
    from rltrain.types import RolloutStatus, Span, SpanKind, Task

    out: dict[str, float] = {}
    start = phase_start()
    store.enqueue_tasks([Task(id=p["id"], payload=p) for p in tasks])
    out["enqueue"] = len(tasks) / (time.perf_counter() - start)
    start = phase_start()
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
    start = phase_start()
    for group in spans:
        store.add_spans(group)
    out["spans"] = n_spans / (time.perf_counter() - start)
    start = phase_start()
    for rollout, attempt in claimed:
        store.finish_attempt(rollout.rollout_id, attempt.attempt_no, RolloutStatus.SUCCEEDED, reward=1.0)
    out["succeed"] = len(tasks) / (time.perf_counter() - start)
    start = phase_start()
    read = 0
    for rollout, _ in claimed:
        read += len(store.get_spans(rollout.rollout_id))
    out["query"] = len(tasks) / (time.perf_counter() - start)
    assert read == n_spans, (read, n_spans)
    assert store.get_rollout(claimed[-1][0].rollout_id).status == RolloutStatus.SUCCEEDED
    return out


def rltrain_trial_on_fresh_store(
    make_store: Callable[[Path], Store], tasks: list[dict[str, Any]], attrs: list[list[dict[str, Any]]]
) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="rltrain-bench-store-") as tmp:
        store = make_store(Path(tmp) / "store.sqlite")
        try:
            return rltrain_trial(store, tasks, attrs)
        finally:
            store.close()


def run() -> list[Row]:
    from rltrain.store import MemoryStore, SqliteStore

    log(
        f"store: {STORE_ROLLOUTS} rollouts x {STORE_SPANS_PER_ROLLOUT} spans, {REPEATS} rounds, each one trial "
        "of: Agent Lightning InMemoryLightningStore (per-item API, batch API), rltrain MemoryStore, SqliteStore"
    )
    tasks, attrs = store_tasks(), store_span_attributes()
    stores: dict[str, Callable[[Path], Store]] = {
        "MemoryStore": lambda _path: MemoryStore(),
        "SqliteStore": SqliteStore,
    }
    trials: dict[str, list[dict[str, float]]] = {name: [] for name in ("per_item", "batch", *stores)}
    spec = {"rollouts": STORE_ROLLOUTS, "spans_per_rollout": STORE_SPANS_PER_ROLLOUT}
    with peer_session(PEER_SCRIPT, spec) as peer:
        for round_no in range(REPEATS):
            log(f"store: round {round_no + 1} of {REPEATS}")
            for api in ("per_item", "batch"):
                trials[api].append(peer({"batch": api == "batch"}))
            for name, make_store in stores.items():
                trials[name].append(rltrain_trial_on_fresh_store(make_store, tasks, attrs))
    peer_item, peer_batch = per_phase_medians(trials["per_item"]), per_phase_medians(trials["batch"])
    rows = []
    for name, target in (("SqliteStore", 1.0), ("MemoryStore", 5.0)):
        ours = per_phase_medians(trials[name])
        for key, label, unit in PHASES:
            best = max(peer_item[key], peer_batch[key])
            api = "batch" if peer_batch[key] >= peer_item[key] else "per-item"
            note = f"peer {api} API" if key in ("enqueue", "spans") else ""
            rows.append(Row(f"store/{name}", label, unit, ours[key], best, target_ratio=target, note=note))
    return rows


if __name__ == "__main__":
    report(run())

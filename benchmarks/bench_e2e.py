"""End to end without an LLM: 500 tasks, an agent that returns a constant reward, through runner and store.

The figure is rollouts per second of wall time including start-up, measured after the imports (imports are
benchmark 5): rltrain opens its durable SQLite store in a fresh directory, builds a
:class:`~rltrain.runner.Runner` (8 concurrent rollouts, the default) and runs the tasks to completion; the peer
builds a ``Trainer`` and runs ``Trainer.dev`` (its ``Baseline`` algorithm, a ``LitAgentRunner`` per runner,
its default tracer and store) to completion. Both agents are plain synchronous functions returning 1.0, the way a
user writes one; rltrain's async-agent figure is shown for information.

The peer's throughput depends on its polling intervals (``Baseline.polling_interval`` and the runner's
``poll_interval``, both 5 s by default) and its execution strategy, so it is measured in several configurations
and its best median is the figure the target is judged on; its default polling is shown for information (on
20 tasks: at ~1 rollout/s, 500 would take minutes). Target (issue 8): >= 5x.
``python benchmarks/bench_e2e.py`` (``--json`` for machine-readable rows).
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPEATS, Row, log, median, report
from _peer import run_peer
from _workloads import E2E_TASKS, e2e_tasks

#: (label, execution strategy, runners, polling interval s, tasks, repeats); None = the peer's own default
PEER_CONFIGS: tuple[tuple[str, str | None, int, float | None, int, int], ...] = (
    ("shared-memory strategy, 1 runner, 0.1 s polling", "shm", 1, 0.1, E2E_TASKS, REPEATS),
    ("client-server strategy, 1 runner, 0.5 s polling", None, 1, 0.5, E2E_TASKS, REPEATS),
    ("client-server strategy, 2 runners, 0.5 s polling", None, 2, 0.5, E2E_TASKS, REPEATS),
    ("client-server strategy, 4 runners, 0.5 s polling", None, 4, 0.5, E2E_TASKS, REPEATS),
    ("default polling (5 s), 1 runner, 20 tasks", None, 1, None, 20, 1),
)

PEER_SCRIPT = r"""
import json, logging, statistics, sys, time
logging.disable(logging.CRITICAL)
import agentlightning as agl
from agentlightning import LitAgent, Trainer
from agentlightning.algorithm import Baseline
from _workloads import e2e_tasks

spec = json.load(sys.stdin)

class ConstantAgent(LitAgent):
    def rollout(self, task, resources, rollout):
        return 1.0

tasks = e2e_tasks(spec["tasks"])
poll = spec["polling"]
rates = []
for _ in range(spec["repeats"]):
    start = time.perf_counter()
    kwargs = {}
    if spec["strategy"] is not None:
        # the algorithm on the main thread: it ends the run when the dataset is done (the default waits on
        # the runner, which polls forever)
        kwargs["strategy"] = {"type": spec["strategy"], "n_runners": spec["runners"], "main_thread": "algorithm"}
    if poll is not None:
        kwargs["runner"] = {"type": "agentlightning.runner.LitAgentRunner", "poll_interval": poll}
    trainer = Trainer(
        n_runners=spec["runners"],
        algorithm=Baseline(span_verbosity="none") if poll is None
        else Baseline(span_verbosity="none", polling_interval=poll, max_queue_length=len(tasks)),
        initial_resources={"prompt": agl.PromptTemplate(template="{request}", engine="f-string")},
        **kwargs,
    )
    trainer.dev(ConstantAgent(), train_dataset=tasks)
    rates.append(len(tasks) / (time.perf_counter() - start))
print(json.dumps({"per_s": statistics.median(rates)}))
"""


def rltrain_once(agent: Any, n_tasks: int) -> float:
    """Rollouts/s for one run: store opened, runner built, all tasks run, store closed."""
    from rltrain.recipes import RunnerConfig
    from rltrain.runner import Runner
    from rltrain.store import SqliteStore
    from rltrain.types import LLMResource, Resources, RolloutStatus, Task

    rows = e2e_tasks(n_tasks)
    with tempfile.TemporaryDirectory(prefix="rltrain-bench-e2e-") as tmp:
        start = time.perf_counter()
        store = SqliteStore(Path(tmp) / "run" / "store.sqlite")
        try:
            runner = Runner(store, agent, "http://127.0.0.1:9", RunnerConfig(), progress=False)
            resources = Resources(llm=LLMResource(base_url="http://127.0.0.1:9/v1", model="policy"))
            tasks = [Task.from_row(row, i) for i, row in enumerate(rows)]
            result = asyncio.run(runner.run(tasks, resources, mode="train"))
        finally:
            store.close()
        elapsed = time.perf_counter() - start
    assert result.stats.succeeded == n_tasks and all(
        r.status == RolloutStatus.SUCCEEDED for r in result.rollouts
    )
    return n_tasks / elapsed


def measure_rltrain() -> dict[str, float]:
    from rltrain.agent import rollout

    @rollout(needs_llm=False)
    def constant_agent(task: dict[str, Any], resources: Any) -> float:
        return 1.0

    @rollout(needs_llm=False)
    async def constant_agent_async(task: dict[str, Any], resources: Any) -> float:
        return 1.0

    return {
        "sync": median([rltrain_once(constant_agent, E2E_TASKS) for _ in range(REPEATS)]),
        "async": median([rltrain_once(constant_agent_async, E2E_TASKS) for _ in range(REPEATS)]),
    }


def run() -> list[Row]:
    log(f"e2e: rltrain Runner + SqliteStore, {E2E_TASKS} tasks, sync and async constant agents")
    ours = measure_rltrain()
    peer: dict[str, float] = {}
    for label, strategy, runners, polling, tasks, repeats in PEER_CONFIGS:
        log(f"e2e: Agent Lightning Trainer.dev, {label}")
        spec = {
            "strategy": strategy,
            "runners": runners,
            "polling": polling,
            "tasks": tasks,
            "repeats": repeats,
        }
        peer[label] = run_peer(PEER_SCRIPT, spec, timeout_s=300)["per_s"]
    default_label = PEER_CONFIGS[-1][0]
    best_label = max((label for label in peer if label != default_label), key=peer.__getitem__)
    best = peer[best_label]
    rows = [
        Row(
            "e2e",
            "500 rollouts, sync agent",
            "rollouts/s",
            ours["sync"],
            best,
            target_ratio=5.0,
            note=f"peer best: {best_label}",
        ),
        Row("e2e", "500 rollouts, async agent", "rollouts/s", ours["async"], best, note="information"),
    ]
    rows += [
        Row("e2e", f"peer: {label}", "rollouts/s", ours["sync"], rate, note="information")
        for label, rate in peer.items()
        if label != best_label
    ]
    return rows


if __name__ == "__main__":
    report(run())

"""Metrics: ``metrics.jsonl`` in the run directory, evaluation summaries, and reporting integrations.

``metrics.jsonl`` is append-only, one JSON object per line, flushed and fsynced per line: a killed process
loses at most the line it was writing, and :func:`read_metrics` skips a torn last line instead of failing.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from rltrain.distributed import is_main
from rltrain.types import Rollout, RolloutStatus, Span, SpanKind

logger = logging.getLogger(__name__)


class EvalSummary(BaseModel):
    """How an agent did on one task set. Failed or timed-out rollouts count as reward 0 (and wrong)."""

    model_config = ConfigDict(extra="forbid")

    task_set: str
    n: int
    accuracy: float = Field(description="fraction of rollouts with reward 1.0")
    mean_reward: float
    parseable: float | None = Field(default=None, description="fraction whose answer could be parsed")
    answer_distribution: dict[str, float] = Field(default_factory=dict)
    failed: int = 0
    timed_out: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    llm_calls: int = 0
    cut_replies: int = Field(
        default=0, description="llm calls whose reply was cut by max_tokens (finish_reason `length`): an answer cut "
        "before it ends can still parse, so a nonzero count means raise sampling.eval.max_tokens",
    )
    tool_calls: int = Field(default=0, description="llm calls that answered with a tool call")
    tool_errors: int = Field(
        default=0, description="tool calls the tool could not execute (unknown tool, bad arguments): recorded as "
        "the tool span's error; valid calls = tool spans - tool_errors",
    )
    tool_spans: int = Field(default=0, description="tool calls executed (one llm call may make several)")
    mean_latency_s: float = 0.0
    wall_s: float = 0.0

    @property
    def tool_call_rate(self) -> float:
        """Share of rollouts' llm calls that called a tool (about 1/2 for a call-then-answer agent)."""
        return self.tool_calls / self.llm_calls if self.llm_calls else 0.0

    @property
    def valid_call_rate(self) -> float | None:
        """Share of executed tool calls the tool accepted (None when no tool was called)."""
        return 1.0 - self.tool_errors / self.tool_spans if self.tool_spans else None


def summarise(
    task_set: str,
    rollouts: list[Rollout],
    spans_of: dict[str, list[Span]],
    answers: dict[str, str | None],
    wall_s: float,
) -> EvalSummary:
    """Aggregate finished rollouts (and their spans) into an :class:`EvalSummary`."""
    n = len(rollouts)
    rewards = [r.reward if r.status is RolloutStatus.SUCCEEDED and r.reward is not None else 0.0 for r in rollouts]
    prompt_tokens = completion_tokens = calls = cut = tool_calls = tool_spans = tool_errors = 0
    for spans in spans_of.values():
        for span in spans:
            if span.kind is SpanKind.TOOL:
                tool_spans += 1
                tool_errors += bool(span.attributes.get("error"))
            elif span.kind is SpanKind.LLM:
                usage = span.attributes.get("usage", {})
                prompt_tokens += int(usage.get("prompt_tokens", 0))
                completion_tokens += int(usage.get("completion_tokens", 0))
                calls += 1
                cut += span.attributes.get("finish_reason") == "length"
                tool_calls += bool(span.attributes.get("tool_calls"))
    latencies = [r.ended_at - r.started_at for r in rollouts if r.ended_at and r.started_at]
    counted = Counter(answers.get(r.rollout_id) or "<unparsed>" for r in rollouts)
    if cut:
        logger.warning(
            "%s: %d of %d replies were cut by max_tokens (finish_reason 'length'; the eval table's `cut` column): "
            "a cut answer is graded as written, so raise sampling.eval.max_tokens if they are meant to be longer",
            task_set, cut, calls,
        )
    return EvalSummary(
        task_set=task_set,
        n=n,
        accuracy=sum(1 for x in rewards if x >= 1.0) / n if n else 0.0,
        mean_reward=sum(rewards) / n if n else 0.0,
        parseable=(1.0 - counted.get("<unparsed>", 0) / n) if n and answers else None,
        answer_distribution={k: v / n for k, v in counted.most_common()} if answers else {},
        failed=sum(r.status is RolloutStatus.FAILED for r in rollouts),
        timed_out=sum(r.status is RolloutStatus.TIMED_OUT for r in rollouts),
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        llm_calls=calls,
        cut_replies=cut,
        tool_calls=tool_calls,
        tool_spans=tool_spans,
        tool_errors=tool_errors,
        mean_latency_s=sum(latencies) / len(latencies) if latencies else 0.0,
        wall_s=wall_s,
    )


class MetricsWriter:
    """Appends metric records to ``metrics.jsonl`` (durably) and forwards them to ``report_to`` backends.

    Each line carries its wall-clock ``time``, so that reports can say how long each stage of a run took. In a
    multi-process run only the main process writes (one line per event, not one per rank); the others' writes
    are dropped.
    """

    def __init__(self, path: Path, report_to: list[str] | None = None, run_name: str = "run") -> None:
        self.path = path
        self.enabled = is_main()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._backends = [_make_backend(name, path.parent, run_name) for name in (report_to or [])
                          if self.enabled]

    def write(self, record: dict[str, Any], step: int | None = None) -> None:
        if not self.enabled:
            return
        line = json.dumps({"step": step, "time": round(time.time(), 3), **record}, default=float)
        with self.path.open("a") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        numeric = {k: float(v) for k, v in record.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        for backend in self._backends:
            backend(numeric, step)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All complete records; a torn last line (process killed mid-write) is skipped with a warning."""
    if not path.exists():
        return []
    records = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                logger.warning("%s: last line is incomplete (interrupted write); ignoring it", path)
            else:
                raise
    return records


def _make_backend(name: str, run_dir: Path, run_name: str) -> Any:
    """A callable ``(metrics, step)`` for one ``report_to`` entry, imported only when asked for."""
    if name == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

        def tb(metrics: dict[str, float], step: int | None) -> None:
            for key, value in metrics.items():
                writer.add_scalar(key, value, step)
            writer.flush()

        return tb
    if name == "wandb":
        import wandb

        run = wandb.init(project="rltrain", name=run_name, dir=str(run_dir), resume="allow")
        return lambda metrics, step: run.log(metrics, step=step)
    if name == "mlflow":
        import mlflow

        mlflow.start_run(run_name=run_name)
        return lambda metrics, step: mlflow.log_metrics(metrics, step=step)
    raise ValueError(f"report_to: unknown backend {name!r}; expected tensorboard, wandb or mlflow")


def rewrite_metrics(path: Path, keep: Any) -> int:
    """Keep only the records for which ``keep(record)`` is true (atomic rewrite); returns how many were dropped.
    Used on resume so the steps after the last checkpoint are not logged twice."""
    records = read_metrics(path)
    kept = [r for r in records if keep(r)]
    if len(kept) == len(records):
        return 0
    tmp = path.with_suffix(".jsonl.tmp")
    with tmp.open("w") as fh:
        for record in kept:
            fh.write(json.dumps(record, default=float) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return len(records) - len(kept)


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def plot_run(metrics_path: Path, out: Path) -> Path | None:
    """A PNG of training reward per step and validation accuracy per evaluation; None when nothing to plot."""
    records = read_metrics(metrics_path)
    reward = [(r["step"], r["train/reward_mean"]) for r in records if r.get("event") == "rollouts"]
    evals: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        for key, value in r.items():
            if key.endswith("/accuracy") and r.get("step") is not None:
                task_set = key.split("/")[1]
                evals.setdefault(task_set, []).append((r["step"], value))
    if not reward and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if reward:
        ax.plot(*zip(*reward, strict=True), label="train reward (mean of rollouts)", alpha=0.6)
    for task_set, points in evals.items():
        ax.plot(*zip(*sorted(points), strict=True), marker="o", label=f"val accuracy: {task_set}")
    ax.set_xlabel("step")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out

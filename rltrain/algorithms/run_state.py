"""What a run directory carries from one process of a run to the next, for every training algorithm.

* the best adapter: ``best/`` holds the adapter that scored highest so far on the selection set (``data.select``,
  else the first validation set), with ``best/rltrain_best.json`` naming its step and accuracy and holding its
  summaries, so that a resumed run (or GRPO after a warm start) goes on comparing against it;
* what an interrupted process left behind: rollouts still queued or running, and metric lines of steps that
  will be produced again (:func:`settle_interrupted`);
* which checkpoint to resume from: the newest *complete* one (:func:`last_complete_checkpoint`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rltrain.metrics import EvalSummary

if TYPE_CHECKING:
    from rltrain.run_context import RunContext

logger = logging.getLogger(__name__)

BEST_MARKER = "rltrain_best.json"
#: the file the Hugging Face Trainer writes last into a checkpoint folder
TRAINER_STATE = "trainer_state.json"


def best_accuracy(run_dir: Path) -> float | None:
    """The accuracy of the adapter in ``run_dir/best``, or ``None`` when none was kept yet."""
    marker = run_dir / "best" / BEST_MARKER
    return json.loads(marker.read_text())["accuracy"] if marker.exists() else None


def best_summaries(run_dir: Path) -> tuple[int, list[EvalSummary]] | None:
    """The step of the adapter in ``run_dir/best`` and its validation summaries (every set), or ``None``."""
    marker = run_dir / "best" / BEST_MARKER
    if not marker.exists():
        return None
    record = json.loads(marker.read_text())
    return record["step"], [EvalSummary.model_validate(s) for s in record.get("summaries", [])]


def selection_summary(summaries: list[EvalSummary], select: str | None) -> EvalSummary:
    """The summary a checkpoint is chosen by: the ``data.select`` set's, else the first validation set's."""
    if select is None:
        return summaries[0]
    for summary in summaries:
        if summary.task_set == select:
            return summary
    raise ValueError(f"no summary of the selection set {select!r} among {[s.task_set for s in summaries]}")


def keep_if_best(run_dir: Path, model: Any, summaries: list[EvalSummary], step: int, select: str | None = None) -> bool:
    """Save ``model``'s adapter as ``best`` when it beats the best so far on the selection set (``data.select``,
    else the first validation set); the marker keeps every set's summary of that adapter."""
    chosen = selection_summary(summaries, select)
    best = best_accuracy(run_dir)
    if best is not None and chosen.accuracy <= best:
        return False
    model.save_pretrained(run_dir / "best")
    (run_dir / "best" / BEST_MARKER).write_text(json.dumps({
        "step": step, "accuracy": chosen.accuracy, "task_set": chosen.task_set,
        "summaries": [s.model_dump() for s in summaries],
    }))
    return True


def last_complete_checkpoint(checkpoints_dir: Path) -> str | None:
    """The newest ``checkpoint-N`` folder that was written to the end, or ``None`` when there is none.

    The Hugging Face Trainer writes a checkpoint in place, adapter first and ``trainer_state.json`` last, so a
    process killed while saving leaves a folder that looks like the newest checkpoint but cannot be resumed
    from. A checkpoint counts as complete when its ``trainer_state.json`` parses and names step ``N``; newer
    incomplete ones are skipped with a warning (the next save of that step overwrites them).
    """
    if not checkpoints_dir.is_dir():
        return None
    numbered = []
    for folder in checkpoints_dir.iterdir():
        prefix, _, number = folder.name.rpartition("-")
        if prefix == "checkpoint" and number.isdigit() and folder.is_dir():
            numbered.append((int(number), folder))
    for step, folder in sorted(numbered, reverse=True):
        try:
            state = json.loads((folder / TRAINER_STATE).read_text())
        except (OSError, json.JSONDecodeError):
            state = None
        if isinstance(state, dict) and state.get("global_step") == step:
            return str(folder)
        logger.warning("resume: %s is incomplete (the process was killed while saving it?); skipping it", folder)
    return None


def settle_interrupted(rl: RunContext, checkpoint: str | None) -> None:
    """Before resuming: cancel rollouts a killed process left queued/running, and drop metric lines of steps
    after the checkpoint (they will be produced again), so nothing is counted twice."""
    from rltrain.metrics import rewrite_metrics
    from rltrain.types import RolloutStatus

    stale = [r.rollout_id for status in (RolloutStatus.QUEUED, RolloutStatus.RUNNING)
             for r in rl.store.list_rollouts(status=status)]
    if stale:
        rl.store.cancel_rollouts(stale)
        logger.info("resume: cancelled %d rollouts left unfinished by the interrupted run", len(stale))
    step = int(Path(checkpoint).name.rsplit("-", 1)[-1]) if checkpoint else 0
    dropped = rewrite_metrics(rl.run_dir / "metrics.jsonl", keep=lambda rec: (rec.get("step") or 0) <= step
                              and rec.get("event") != "done")
    if dropped:
        logger.info("resume: dropped %d metric lines logged after step %d", dropped, step)


def accuracies(summaries: list[EvalSummary]) -> str:
    """``public:val 0.417, generated:n=40,seed=99 0.300``: validation results for a log line."""
    return ", ".join(f"{s.task_set} {s.accuracy:.3f}" for s in summaries)

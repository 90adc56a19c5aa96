"""What a run directory carries from one process of a run to the next, for every training algorithm.

* the best adapter: ``best/`` holds the adapter that scored highest so far on the selection set (``data.select``,
  else the first validation set), with ``best/rltrain_best.json`` naming its step and accuracy and holding its
  summaries, so that a resumed run (or GRPO after a warm start) goes on comparing against it;
* what an interrupted process left behind: rollouts still queued or running, and metric lines of stages that
  will be produced again (:func:`settle_interrupted`);
* which checkpoint to resume from: the newest *complete* one (:func:`last_complete_checkpoint`), refused before
  anything is touched when the recipe no longer describes its adapter (:func:`check_adapter_shape`);
* whether the run is finished (:func:`finished_run`): resuming a finished run does nothing.

Resume is idempotent because each stage's metric lines are written by exactly one process. The stages and where
a kill can land:

* the baseline validation (step 0): its lines are kept only when it completed (``eval/baseline.json`` is written
  after its last line); otherwise they are dropped and it runs again;
* each training step ``k`` (its ``rollouts`` line, TRL's ``train`` line, a validation every ``eval_steps``): all of
  them carry ``step = k``, the optimiser step they lead to, so they are kept exactly when checkpoint ``k`` is
  complete, and otherwise dropped and produced again by the step run again;
* the final validation (label ``val-step{max_steps}``): dropped and run again unless the ``done`` line follows it;
  with checkpoint ``max_steps`` complete the resumed process loads it and trains no further step
  (:func:`train_or_restore`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rltrain.distributed import is_main
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


class ResumeError(ValueError):
    """A run directory cannot be resumed as it is (no training recipe, an adapter of another shape)."""


#: validations before step 1 whose lines are kept on resume only when they completed (their eval file exists)
OPENING_VALIDATIONS = ("baseline", "warm_start")


def validated(run_dir: Path, label: str) -> bool:
    """Whether the validation ``label`` ran to its end in this run directory (its ``eval/<label>.json`` is written
    after its last metric line)."""
    return (run_dir / "eval" / f"{label}.json").exists()


def checkpoint_step(checkpoint: str | None) -> int:
    """``N`` of ``.../checkpoint-N``; 0 without a checkpoint."""
    return int(Path(checkpoint).name.rsplit("-", 1)[-1]) if checkpoint else 0


def finished_run(run_dir: Path, max_steps: int | None = None) -> dict[str, Any] | None:
    """The ``done`` line of a run that finished, else ``None``. With ``max_steps`` (GRPO/PPO), a run that finished
    fewer steps is not finished: its recipe's budget was raised, and resume trains the steps added."""
    from rltrain.metrics import read_metrics

    done = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("event") == "done"]
    if not done or (max_steps is not None and (done[-1].get("step") or 0) < max_steps):
        return None
    return done[-1]


def finished_summaries(run_dir: Path, select: str | None) -> list[EvalSummary]:
    """What a finished run reported: the adapter chosen on ``select`` (``best/``), else its final validation."""
    best = best_summaries(run_dir) if select else None
    if best is not None:
        return best[1]
    done = finished_run(run_dir) or {}
    for label in (f"val-step{done.get('step')}", "final"):
        path = run_dir / "eval" / f"{label}.json"
        if path.exists():
            return [EvalSummary.model_validate(s) for s in json.loads(path.read_text())]
    return []


def check_adapter_shape(run_dir: Path, checkpoint: str | None, lora: Any) -> None:
    """Refuse to resume when ``recipe.yaml``'s ``lora`` no longer matches the adapter the run saved (its newest
    checkpoint, else its warm start): loading it would fail after minutes, with dozens of size mismatches, once
    the metric lines were already settled."""
    folders = [Path(checkpoint)] if checkpoint else []
    folders.append(run_dir / "warm_start")
    for folder in folders:
        config_file = folder / "adapter_config.json"
        if not config_file.exists():
            continue
        saved = json.loads(config_file.read_text())
        wanted = {"r": lora.r, "alpha": lora.alpha}
        found = {"r": saved.get("r"), "alpha": saved.get("lora_alpha")}
        if isinstance(lora.target_modules, list):
            wanted["target_modules"] = sorted(lora.target_modules)
            found["target_modules"] = sorted(saved.get("target_modules") or [])
        for field_name, value in wanted.items():
            if found[field_name] != value:
                raise ResumeError(
                    f"{run_dir / 'recipe.yaml'}: lora.{field_name} is {value!r}, but the adapter in {folder} was "
                    f"trained with {found[field_name]!r}; a run cannot change its adapter on resume (set it back, "
                    "or start a new run)"
                )
        return


def settle_interrupted(rl: RunContext, checkpoint: str | None, final_label: str | None = None) -> None:
    """Before resuming: cancel rollouts a killed process left queued/running, and drop the metric lines the
    resumed process will write again (see the module docstring), so each is written once: lines of steps after
    the checkpoint, of an opening validation that did not complete, of the final validation (``final_label``),
    and the ``done`` line."""
    from rltrain.metrics import rewrite_metrics
    from rltrain.types import RolloutStatus

    stale = [r.rollout_id for status in (RolloutStatus.QUEUED, RolloutStatus.RUNNING)
             for r in rl.store.list_rollouts(status=status)]
    if stale:
        rl.store.cancel_rollouts(stale)
        logger.info("resume: cancelled %d rollouts left unfinished by the interrupted run", len(stale))
    step = checkpoint_step(checkpoint)
    redone = {label for label in OPENING_VALIDATIONS if not validated(rl.run_dir, label)} | {"done", final_label}

    def keep(record: dict[str, Any]) -> bool:
        return (record.get("step") or 0) <= step and record.get("event") not in redone

    dropped = rewrite_metrics(rl.run_dir / "metrics.jsonl", keep=keep)
    if dropped:
        logger.info("resume: dropped %d metric lines that the resumed run writes again (after step %d)", dropped, step)


def resume_checkpoint(rl: RunContext, lora: Any, max_steps: int) -> str | None:
    """Where a GRPO/PPO run resumes: its newest complete checkpoint, after checking that the recipe still
    describes its adapter and settling what the interrupted process left (in that order: a refusal touches
    nothing)."""
    checkpoint = last_complete_checkpoint(rl.run_dir / "checkpoints")
    check_adapter_shape(rl.run_dir, checkpoint, lora)
    if is_main():  # the one writer of a multi-process run; the other ranks only read the checkpoint
        settle_interrupted(rl, checkpoint, final_label=f"val-step{max_steps}")
    return checkpoint


def train_or_restore(trl_trainer: Any, checkpoint: str | None, max_steps: int) -> None:
    """Train up to ``max_steps``; when the checkpoint already is step ``max_steps`` (the process was killed
    during the final validation) only load it: the Hugging Face Trainer would otherwise run one step more."""
    if checkpoint is not None and checkpoint_step(checkpoint) >= max_steps:
        logger.info("resume: %s is the last step; loading it, no further training", checkpoint)
        trl_trainer._load_from_checkpoint(checkpoint)
        return
    trl_trainer.train(resume_from_checkpoint=checkpoint)


def accuracies(summaries: list[EvalSummary]) -> str:
    """``public:val 0.417, generated:n=40,seed=99 0.300``: validation results for a log line."""
    return ", ".join(f"{s.task_set} {s.accuracy:.3f}" for s in summaries)

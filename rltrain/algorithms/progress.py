"""The progress bar of rltrain's TRL trainers: transformers' bar, without a printed log dict per step.

Every step's logs already go to ``metrics.jsonl`` (and ``report_to``); printed under the bar as well, they push
the bar and the before/after tables off the screen of a short run such as ``make demo``.
"""

from __future__ import annotations

from typing import Any

from transformers import PrinterCallback, ProgressCallback


class StepProgress(ProgressCallback):
    """A bar per training run; step logs are left to the metrics writer."""

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        return None


def quiet_progress(trainer: Any) -> None:
    """Swap a transformers/TRL trainer's stdout logging for :class:`StepProgress` (its bar only)."""
    trainer.remove_callback(PrinterCallback)
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(StepProgress)

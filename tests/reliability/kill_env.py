"""The even-length environment, killing its own process (``SIGKILL``) at one chosen point of a training run.

A recipe names it as ``env.name: kill_env:KillingEvenLengthEnv``; the point comes from the environment variable
``RLTRAIN_TEST_KILL_AT`` of the process (so each ``rltrain resume`` of one run directory can die somewhere
else), and the hooks are installed when the command builds the environment, before any work:

* ``baseline``: right after the baseline's first metric line (of two validation sets, one is logged);
* ``sampling:V``: when the third rollout of policy version ``V`` finishes, the others of the step still running;
* ``optimiser:N``: before this process's ``N``-th optimiser step (the step's rollouts are sampled and logged);
* ``save:K``: while checkpoint ``K`` is written (its folder holds half an adapter, no trainer state);
* ``final:K``: right after the first metric line of the final validation ``val-stepK``;
* ``fill:K``: not a kill: right before checkpoint ``K`` is written, the disk is filled (the file
  ``$RLTRAIN_TEST_FILLER``), so that the save itself runs out of space.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

from even_length_env import EvenLengthEnv, even_length_agent

from rltrain.agent import Agent, rollout
from rltrain.types import Resources

KILL_AT = "RLTRAIN_TEST_KILL_AT"
FILLER = "RLTRAIN_TEST_FILLER"


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class KillingEvenLengthEnv(EvenLengthEnv):
    """``EvenLengthEnv`` (any spec gives the same ``n_tasks`` tasks) that kills its process at ``$RLTRAIN_TEST_KILL_AT``."""

    name = "killing_even_length"

    def __init__(self, n_tasks: int = 4) -> None:
        super().__init__(n_tasks=n_tasks)
        point, _, number = os.environ.get(KILL_AT, "").partition(":")
        self.point, self.number = point, int(number or 0)
        self._finished = 0
        self._lock = threading.Lock()
        self._agent = rollout(self._run, name="killing_even_length_agent")
        if self.point in ("baseline", "final"):
            self._kill_after_line("baseline" if self.point == "baseline" else f"val-step{self.number}")
        elif self.point == "optimiser":
            self._kill_at_optimiser_step(self.number)
        elif self.point == "save":
            self._kill_while_saving(self.number)
        elif self.point == "fill":
            self._fill_disk_before_saving(self.number, Path(os.environ[FILLER]))

    def agent(self, mode: str) -> Agent:
        return self._agent

    def _run(self, task: dict, resources: Resources) -> float:
        reward = even_length_agent(task, resources)
        if self.point == "sampling" and resources.version == self.number:
            with self._lock:
                self._finished += 1
                if self._finished == 3:
                    die()
        return reward

    @staticmethod
    def _kill_after_line(event: str) -> None:
        from rltrain.metrics import MetricsWriter

        write = MetricsWriter.write

        def write_then_die(self: MetricsWriter, record: dict[str, Any], step: int | None = None) -> None:
            write(self, record, step)
            if record.get("event") == event:
                die()

        MetricsWriter.write = write_then_die  # type: ignore[method-assign]

    @staticmethod
    def _kill_at_optimiser_step(n: int) -> None:
        import torch

        step = torch.optim.AdamW.step
        calls = [0]

        def step_or_die(self: Any, *args: Any, **kwargs: Any) -> Any:
            calls[0] += 1
            if calls[0] == n:
                die()
            return step(self, *args, **kwargs)

        torch.optim.AdamW.step = step_or_die  # type: ignore[method-assign]

    @staticmethod
    def _kill_while_saving(k: int) -> None:
        import transformers

        save = transformers.Trainer._save_checkpoint

        def save_or_die(self: Any, model: Any, trial: Any) -> None:
            if self.state.global_step != k:
                return save(self, model, trial)
            folder = Path(self.args.output_dir) / f"checkpoint-{k}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "adapter_model.safetensors").write_bytes(b"\0" * 1000)  # torn: half written, no state
            die()

        transformers.Trainer._save_checkpoint = save_or_die  # type: ignore[method-assign]

    @staticmethod
    def _fill_disk_before_saving(k: int, filler: Path) -> None:
        import transformers

        save = transformers.Trainer._save_checkpoint

        def fill_then_save(self: Any, model: Any, trial: Any) -> None:
            if self.state.global_step == k:
                fill(filler)
            return save(self, model, trial)

        transformers.Trainer._save_checkpoint = fill_then_save  # type: ignore[method-assign]


def fill(path: Path) -> OSError:
    """Write zeros to ``path`` until its file system is full; the error that stopped the writes."""
    with path.open("wb") as out:
        try:
            while True:
                out.write(b"\0" * 65536)
                out.flush()
        except OSError as exc:
            return exc

"""The even-length environment with a gate, for killing a ``rltrain train`` process in the middle of a step.

A recipe names it as ``env.name: gated_env:GatedEvenLengthEnv`` (the test puts this folder and ``tests/`` on
``PYTHONPATH``), so the command line runs it in a process of its own. Training rollouts of policy version 1 and
later (evaluation always lends version 0) pass while the file ``gate`` is absent only until ``passing`` of them
went through; the others wait for the file to appear. So the process is caught, deterministically, with some
rollouts of step 1 finished and the rest running; the resumed process finds the gate open.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from even_length_env import EvenLengthEnv, even_length_agent

from rltrain.agent import Agent, rollout
from rltrain.types import Resources

#: the longest a held rollout waits for the gate (the test kills the process long before)
WAIT_S = 120.0


class GatedEvenLengthEnv(EvenLengthEnv):
    """``EvenLengthEnv`` whose agent holds training rollouts at the gate file once ``passing`` went through."""

    name = "gated_even_length"

    def __init__(self, n_tasks: int = 4, gate: str = "gate", passing: int = 3) -> None:
        super().__init__(n_tasks=n_tasks)
        self.gate = Path(gate)
        self.passing = passing
        self._passed = 0
        self._lock = threading.Lock()
        self._agent = rollout(self._run, name="gated_even_length_agent")

    def agent(self, mode: str) -> Agent:
        return self._agent

    def _run(self, task: dict, resources: Resources) -> float:
        if resources.version >= 1 and not self._may_pass():
            deadline = time.monotonic() + WAIT_S
            while not self.gate.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        return even_length_agent(task, resources)

    def _may_pass(self) -> bool:
        with self._lock:
            self._passed += 1
            return self._passed <= self.passing or self.gate.exists()

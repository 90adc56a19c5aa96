"""``rltrain`` command lines run in subprocesses by the process-fault tests, able to import the test environments
of this folder and of ``tests/`` (a recipe names them as ``env.name: module:Class``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def rltrain(
    *args: str, log: Path, extra_env: dict[str, str] | None = None, no_progress: bool = True
) -> subprocess.Popen[str]:
    """``rltrain ARGS --no-progress`` in a subprocess (``no_progress=False`` for a command without bars, such as
    ``serve``); its output goes to ``log``."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **(extra_env or {}),
    }
    executable = Path(sys.executable).parent / "rltrain"
    with log.open("w") as out:  # the child keeps its own copy of the handle
        command = [str(executable), *args, *(["--no-progress"] if no_progress else [])]
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                env=env, text=True)

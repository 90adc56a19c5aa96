"""One process per run directory: a second one is refused with the holder's name before it writes anything,
and a lock left by a killed process is taken over."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from rltrain.recipes import parse_recipe
from rltrain.run_lock import LOCK_FILE, RunDirBusyError, RunDirLock
from rltrain.trainer import Trainer

HOLD = """
import sys, time
from pathlib import Path
from rltrain.run_lock import RunDirLock
RunDirLock(Path(sys.argv[1]), command="rltrain train holder.yaml").acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_a_live_holder_is_named_and_a_killed_ones_lock_is_taken_over(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirBusyError, match=rf"{run_dir} is in use by pid {holder.pid} on .*"
                           r"\(rltrain train holder\.yaml, since .*\)"):
            RunDirLock(run_dir).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(60)
    # the killed holder's name is still in the file, but its lock died with it
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == holder.pid
    with RunDirLock(run_dir, command="rltrain resume run") as lock:
        assert lock.held
        assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert (run_dir / LOCK_FILE).read_text() == "", "released: the file stays, naming nobody"


def test_two_trainers_on_one_run_directory(tmp_path: Path, tiny_model_dir: Path) -> None:
    recipe = parse_recipe({
        "name": "shared", "output_dir": str(tmp_path), "model": {"name": str(tiny_model_dir)},
        "env": {"name": "even_length_env:EvenLengthEnv", "mode": "any"},
    })
    first = Trainer(recipe, progress=False)
    try:
        (tmp_path / "shared" / "recipe.yaml").write_text("# the first process's\n")
        with pytest.raises(RunDirBusyError, match=rf"{tmp_path / 'shared'} is in use by pid {os.getpid()}"):
            Trainer(recipe, progress=False)
        assert (tmp_path / "shared" / "recipe.yaml").read_text() == "# the first process's\n", "nothing written"
    finally:
        first.close()
    Trainer(recipe, progress=False).close()  # free again once the first closed
